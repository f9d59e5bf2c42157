"""The channel-vectorised direct forward (backends/numba/conv/channels.py) against a float64 numpy reference:
strided convs with deep patches, small planes, dilated taps, output channels that fill no whole block of lanes,
two images, float64; its prebound form (the filters laid out once per version, the clip, NaN); and where the
strategy rule sends convs to it (not in training steps); ResNet-18 at batch 1 on it against the reference
backend."""
import numpy as np
import pytest

from graphc.backends.numba import conv as nc
from graphc.backends.numba.conv import channels, direct
from graphc.backends.numba.conv import strategy as conv_strategy


def conv_ref(x, w, b, s, pads, dil=(1, 1)):
    """Direct sum over the taps in float64 (zero padding pads = (top, bottom, left, right))."""
    t, bt, l, r = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (t, bt), (l, r)))
    K, C, KH, KW = w.shape
    Ho = (xp.shape[2] - (KH - 1) * dil[0] - 1) // s + 1
    Wo = (xp.shape[3] - (KW - 1) * dil[1] - 1) // s + 1
    y = np.zeros((x.shape[0], K, Ho, Wo))
    for kh in range(KH):
        for kw in range(KW):
            win = xp[:, :, kh * dil[0]:kh * dil[0] + s * (Ho - 1) + 1:s, kw * dil[1]:kw * dil[1] + s * (Wo - 1) + 1:s]
            y += np.einsum("kc,nchw->nkhw", w[:, :, kh, kw].astype(np.float64), win)
    return y + (0 if b is None else b.astype(np.float64)[None, :, None, None])


# N, C, K, H, W, KH, KW, stride, pads, dilation, dtype
CASES = {
    "strided_3x3_asym_pads": (1, 64, 40, 9, 8, 3, 3, 2, (1, 0, 2, 1), (1, 1), np.float32),
    "strided_1x1_two_images": (2, 256, 48, 6, 7, 1, 1, 2, (0, 0, 0, 0), (1, 1), np.float64),
    "small_plane_3x3": (1, 32, 64, 7, 7, 3, 3, 1, (1, 1, 1, 1), (1, 1), np.float32),
    "small_plane_dilated": (1, 40, 33, 5, 6, 3, 3, 1, (2, 2, 2, 2), (2, 2), np.float32),
    "small_plane_3x3_f64": (1, 40, 20, 5, 5, 3, 3, 1, (1, 1, 1, 1), (1, 1), np.float64),
    "strided_5x5_one_row_a_pass": (1, 3, 40, 17, 16, 5, 5, 2, (2, 2, 2, 1), (1, 1), np.float32),
    "strided_3x3_first_layer": (2, 3, 32, 15, 14, 3, 3, 2, (1, 1, 1, 1), (1, 1), np.float32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_reference(case):
    N, C, K, H, W, KH, KW, s, pads, dil, dt = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dt)
    w = rng.standard_normal((K, C, KH, KW)).astype(dt)
    b = rng.standard_normal(K).astype(dt)
    assert channels.applies(x.shape, w.shape, s, pads, dil, 1, dt)          # (else this tests another kernel)
    want = conv_ref(x, w, b, s, pads, dil)
    tol = dict(rtol=1e-5, atol=1e-4) if dt == np.float32 else dict(rtol=1e-12, atol=1e-11)
    for relu in (False, True):
        got = direct.forward(x, w, b, s, pads, "store", relu=relu, dil=dil)[0]
        assert got.dtype == dt
        np.testing.assert_allclose(got, np.maximum(want, 0) if relu else want, **tol)
    # the strategy a cold start takes for it is direct, so conv2d runs it too
    assert nc.choose_conv_strategy(x.shape, w.shape, s, pads, dt, dilation=dil) == "direct"
    out = np.empty(want.shape, dt)
    assert nc.conv2d(x, w, None, s, pads, dilation=dil, out=out) is out
    np.testing.assert_allclose(out, want - b.astype(np.float64)[None, :, None, None], **tol)


def test_bound_forward_clip_nan_and_filter_versions():
    """The prebound form: the clip (ReLU6) under the flag, NaN passed through, the laid-out filters kept
    while the version holds and made again when it changes, or for another filter array."""
    N, C, K, H, W, KH, KW, s, pads, dil, dt = CASES["strided_3x3_asym_pads"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(dt)
    w = rng.standard_normal((K, C, KH, KW)).astype(dt)
    b = rng.standard_normal(K).astype(dt)
    version = [0]
    run = direct.bind_direct_fwd(x.shape, w.shape, True, s, pads, dt, "store", clip=(0.0, 6.0),
                                 weights_version=lambda: version[0])
    assert isinstance(run, channels.Binding)
    y = np.empty(conv_ref(x, w, b, s, pads).shape, dt)
    run(x, w, b, y, None, True)
    np.testing.assert_allclose(y, np.clip(conv_ref(x, w, b, s, pads), 0, 6), rtol=1e-5, atol=1e-4)
    run(x, w, b, y, None, False)
    np.testing.assert_allclose(y, conv_ref(x, w, b, s, pads), rtol=1e-5, atol=1e-4)
    w *= 2                                   # in place, the version unchanged: the kept layout still answers
    run(x, w, None, y, None, False)
    np.testing.assert_allclose(y, conv_ref(x, w / 2, None, s, pads), rtol=1e-5, atol=1e-4)
    version[0] += 1                          # a new version: laid out again
    run(x, w, None, y, None, False)
    np.testing.assert_allclose(y, conv_ref(x, w, None, s, pads), rtol=1e-5, atol=1e-4)
    w2 = -w                                  # another array: laid out again
    run(x, w2, None, y, None, False)
    np.testing.assert_allclose(y, conv_ref(x, w2, None, s, pads), rtol=1e-5, atol=1e-4)
    x[0, 3, 4, 5] = np.nan                   # NaN reaches exactly the outputs whose window holds it, clip or not
    want = conv_ref(x, w2, b, s, pads)
    run(x, w2, b, y, None, True)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    assert np.isnan(want).sum() == K      # (one window position, stride 2)


def test_prefetching_the_filters_ahead_changes_no_bit(monkeypatch):
    """Filter banks of PREFETCH_MIN_BYTES and more have each input channel's pass prefetch the block of the
    channel PREFETCH_AHEAD on (conv/prefetch.py): the same sums, bit for bit, as the kernel without, and
    the reference's; the last channels, with none ahead, prefetch their own."""
    N, C, K, H, W, KH, KW, s, pads, dil, dt = CASES["small_plane_3x3"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C, H, W)).astype(dt)
    w = rng.standard_normal((K, C, KH, KW)).astype(dt)
    b = rng.standard_normal(K).astype(dt)
    got = {}
    for limit in (1 << 62, 0):
        monkeypatch.setattr(channels, "PREFETCH_MIN_BYTES", limit)
        run = channels.Binding(x.shape, w.shape, s, pads, dil, dt)
        assert run.plan.ahead == (channels.PREFETCH_AHEAD if limit == 0 else 0)
        assert ("prefetch(wk" in run.plan.source()) == (limit == 0)
        got[limit] = np.empty((N, K, H, W), dt)
        run(x, w, b, got[limit], None, True)
    np.testing.assert_array_equal(got[0], got[1 << 62])
    np.testing.assert_allclose(got[0], np.maximum(conv_ref(x, w, b, s, pads, dil), 0), rtol=1e-5, atol=1e-4)
    # ResNet-18's 512 -> 512 filters at batch 1 (9.4 MB laid out) prefetch by default; a 1x1 256 -> 512 (0.5 MB) not
    monkeypatch.undo()
    assert channels.Plan(1, 512, 512, 3, 3, 9, 9, 7, 7, 1, (1, 1), np.float32).ahead == channels.PREFETCH_AHEAD
    assert channels.Plan(1, 256, 512, 1, 1, 14, 14, 7, 7, 2, (1, 1), np.float32).ahead == 0


def test_where_the_rule_sends_convs():
    """ResNet-18 at 224x224, batch 1: its strided convs (the 7x7 first layer, the 3x3 ones, the deep 1x1) and
    its 3x3 convs on 7x7 and 14x14 planes come here; the 3x3 convs on 28x28 planes and up, batch 16 and the
    shallow strided 1x1 do not, nor MobileNetV2's 1x1 convs on 7x7 planes (plain GEMMs)."""
    f32 = np.float32
    yes = [((1, 64, 56, 56), (128, 64, 3, 3), 2, (1, 1, 1, 1)), ((1, 256, 14, 14), (512, 256, 1, 1), 2, (0,) * 4),
           ((1, 512, 7, 7), (512, 512, 3, 3), 1, (1, 1, 1, 1)), ((2, 256, 14, 14), (512, 256, 3, 3), 2, (1,) * 4),
           ((1, 3, 224, 224), (64, 3, 7, 7), 2, (3,) * 4), ((1, 256, 14, 14), (256, 256, 3, 3), 1, (1,) * 4),
           ((1, 3, 224, 224), (32, 3, 3, 3), 2, (1,) * 4)]                 # (MobileNetV2's first layer)
    no = [((1, 128, 28, 28), (128, 128, 3, 3), 1, (1,) * 4), ((1, 320, 7, 7), (1280, 320, 1, 1), 1, (0,) * 4),
          ((1, 16, 56, 56), (32, 16, 3, 3), 2, (1,) * 4),                   # (shallow, not a first layer)
          ((16, 256, 14, 14), (512, 256, 3, 3), 2, (1,) * 4), ((1, 128, 28, 28), (256, 128, 1, 1), 2, (0,) * 4)]
    for xs, ws, s, pads in yes:
        assert channels.applies(xs, ws, s, pads, (1, 1), 1, f32), (xs, ws)
        assert conv_strategy.static_rule("conv2d", s, ws, x_shape=xs, dtype=f32, pads=pads) == "direct"
    for xs, ws, s, pads in no:
        assert not channels.applies(xs, ws, s, pads, (1, 1), 1, f32), (xs, ws)
    assert not channels.applies((1, 64, 7, 7), (64, 4, 3, 3), 1, (1,) * 4, (1, 1), 16, f32)      # grouped


def test_training_steps_keep_the_other_kernels():
    """A training step's filters change every step, and the channel kernels' filter layout would be made again
    each time: there the rules without them answer (im2col for a deep strided conv, the plane kernel for a 7x7
    plane)."""
    f32 = np.float32
    assert nc.choose_conv_strategy((1, 64, 56, 56), (128, 64, 3, 3), 2, (1,) * 4, f32) == "direct"
    assert nc.choose_conv_strategy((1, 64, 56, 56), (128, 64, 3, 3), 2, (1,) * 4, f32, static_filters=False) == "im2col"
    xs, ws = (1, 512, 7, 7), (512, 512, 3, 3)
    assert isinstance(direct.bind_direct_fwd(xs, ws, True, 1, (1,) * 4, f32, "store"), channels.Binding)
    plane = direct.bind_direct_fwd(xs, ws, True, 1, (1,) * 4, f32, "store", channels_ok=False)
    assert plane is not None and not isinstance(plane, channels.Binding)


def test_resnet18_at_batch_one_as_the_reference(monkeypatch):
    """ResNet-18 at 32x32, batch 1, inference on numba (its first layer, strided convs and small-plane 3x3 convs
    on the channel kernels, batch norm folded) gives the reference's logits; after load_state_dict with other
    weights, the laid-out filters follow them."""
    import graphc as gc
    from graphc import models
    calls = []
    run = channels.Binding.__call__
    monkeypatch.setattr(channels.Binding, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
    g = models.load("resnet18", num_classes=10, image_size=32)
    x = {"x": np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32), "labels": np.array([3])}
    ref, nb = gc.compile(g, keep=["logits"]), gc.compile(g, backend="numba", keep=["logits"])
    for round_ in range(2):
        want, got = ref.run(x, outputs=["logits"])["logits"], nb.run(x, outputs=["logits"])["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        state = {k: (v * np.float32(0.9) if k.endswith("weight") else v) for k, v in ref.state_dict().items()}
        ref.load_state_dict(state)
        nb.load_state_dict(state)
    assert len(calls) >= 10            # (its convs ran on the channel kernels: this tests them)
