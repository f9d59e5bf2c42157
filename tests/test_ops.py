"""Reference semantics of every op in the table, against hand-computed values.

The seeds' worked forward examples (the course notes graphc was built from) are copied in as numbers;
nothing outside the project is read at run time. Every test declares the ops it checks with @covers, and
test_every_op_has_a_reference_test fails when an op is added to the table without one, or when every
test of an op was skipped (or failed) in the run: only a test that passed covers its ops.
"""
import functools
import math

import numpy as np
import pytest

import graphc as gc
from graphc.ops import OPS
from graphc.ops.conv import im2col

F64 = dict(rtol=1e-10, atol=1e-12)   # float64 graphs at float64 precision (float32 rounding is ~6e-8 relative)
COVERS: dict = {}       # op -> names of the tests that check it
PASSED: set = set()     # names of this module's @covers tests that ran to their end in this session

# Containers, not computations: a fused node runs its body's table ops (each tested here), a getitem
# picks one of its results. The fusion pass's tests check that a fused graph equals the unfused one.
CONTAINERS = {"fused", "getitem"}


def covers(*ops):
    """Declares the ops a test checks; they count as covered once the test has passed in this run."""
    def mark(fn):
        for op in ops:
            COVERS.setdefault(op, set()).add(fn.__name__)

        @functools.wraps(fn)            # keeps the signature (fixtures, parameters) and the marks
        def test(*args, **kwargs):
            fn(*args, **kwargs)
            PASSED.add(fn.__name__)
        return test
    return mark


def run(build, feeds=None, dtype="float64", training=False):
    """Builds a one-output graph with build(g) -> value (or list of values) and runs it (reference)."""
    g = gc.Graph("t", dtype=dtype)
    out = build(g)
    outs = out if isinstance(out, (list, tuple)) else [out]
    g.output(*outs)
    res = gc.compile(g, backend="reference").run(feeds or {}, training=training)
    return [res[o.name] for o in outs] if isinstance(out, (list, tuple)) else res[out.name]


def naive_conv(x, w, b=None, stride=(1, 1), pads=(0, 0, 0, 0)):
    """Cross-correlation by its definition: y[n,k,i,j] = sum_c,u,v w[k,c,u,v] x[n,c,i*s+u,j*s+v] + b[k]."""
    t, bo, le, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (le, r)))
    n, c, h, wd = xp.shape
    k, _, kh, kw = w.shape
    ho, wo = (h - kh) // stride[0] + 1, (wd - kw) // stride[1] + 1
    out = np.zeros((n, k, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
            out[:, :, i, j] = np.einsum("nchw,kchw->nk", patch, w)
    if b is not None:
        out += b[None, :, None, None]
    return out


def naive_pool(x, size, stride, fn):
    n, c, h, w = x.shape
    ho, wo = (h - size[0]) // stride[0] + 1, (w - size[1]) // stride[1] + 1
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            out[:, :, i, j] = fn(x[:, :, i * stride[0]:i * stride[0] + size[0],
                                   j * stride[1]:j * stride[1] + size[1]], axis=(2, 3))
    return out


# ================================================================== seeds/000: im2col and conv
CH1 = np.arange(1, 17, dtype=float).reshape(4, 4)
CH2 = np.arange(17, 33, dtype=float).reshape(4, 4)
# The im2col matrix printed in seeds/000 for the two 4x4 channels and a 2x2 filter, stride 1.
SEED_IM2COL = np.array([
    [1, 2, 3, 5, 6, 7, 9, 10, 11],
    [2, 3, 4, 6, 7, 8, 10, 11, 12],
    [5, 6, 7, 9, 10, 11, 13, 14, 15],
    [6, 7, 8, 10, 11, 12, 14, 15, 16],
    [17, 18, 19, 21, 22, 23, 25, 26, 27],
    [18, 19, 20, 22, 23, 24, 26, 27, 28],
    [21, 22, 23, 25, 26, 27, 29, 30, 31],
    [22, 23, 24, 26, 27, 28, 30, 31, 32]], dtype=float)


@covers("conv")
def test_im2col_two_channel_matrix_of_seed_000():
    x = np.stack([CH1, CH2])[None]                       # (1, 2, 4, 4)
    cols = im2col(x, 2, 2, (1, 1), (0, 0, 0, 0))
    assert cols.shape == (1, 2 * 2 * 2, 3 * 3)           # (channels*fh*fw, new_ht*new_wd)
    np.testing.assert_array_equal(cols[0], SEED_IM2COL)


@covers("conv", "param", "input", "const")
def test_two_channel_conv_is_flattened_filters_times_im2col():
    # seeds/000's filters: channel 1 [[1,0],[0,-1]], channel 2 [[1,-1],[1,0]] (one 2-channel filter),
    # and a second filter [[1,0],[0,-1]] on both channels. By hand, for a window whose channel-1
    # top-left value is a: filter A gives (a - (a+5)) + ((a+16) - (a+17) + (a+20)) = a + 14,
    # filter B gives -5 + -5 = -10 everywhere.
    w = np.array([[[[1, 0], [0, -1]], [[1, -1], [1, 0]]],
                  [[[1, 0], [0, -1]], [[1, 0], [0, -1]]]], dtype=float)
    a = np.array([[1, 2, 3], [5, 6, 7], [9, 10, 11]], dtype=float)
    expect = np.stack([a + 14, np.full((3, 3), -10.0)])[None]
    x = np.stack([CH1, CH2])[None]
    out = run(lambda g: g.conv(g.input("x", (None, 2, 4, 4)), g.param("w", value=w)), {"x": x})
    np.testing.assert_array_equal(out, expect)
    # the seed's algorithm: C = conv_flatten @ X_im2col, reshaped
    np.testing.assert_array_equal((w.reshape(2, -1) @ SEED_IM2COL).reshape(1, 2, 3, 3), expect)
    # a const filter works the same as a param
    out_c = run(lambda g: g.conv(g.const(x), g.const(w)))
    np.testing.assert_array_equal(out_c, expect)


@covers("conv")
def test_first_seed_conv_example_identity():
    # seeds/000: [[1,0,0],[0,1,0],[0,0,1]] convolved with [[1,0],[0,1]], stride 1 -> [[2,0],[0,2]]
    x = np.eye(3)[None, None]
    out = run(lambda g: g.conv(g.const(x), g.const(np.eye(2)[None, None])))
    np.testing.assert_array_equal(out[0, 0], [[2, 0], [0, 2]])


SEED_5X5 = np.arange(1, 26, dtype=float).reshape(1, 1, 5, 5)


@covers("conv")
def test_seed_5x5_input_3x3_filter_gives_minus_six():
    # seeds/000 prints F = [[1,0,+1],[1,0,-1],[1,0,-1]] and the result -6 everywhere. That filter is a
    # typo: its result is not constant. Every patch of 1..25 has top-left value a and rows a, a+5, a+10;
    # the printed filter gives (a + a+5 + a+10) + (a+2 - (a+7) - (a+12)) = 2a - 2. The filter the seed
    # intends is the vertical-edge detector [[1,0,-1]]*3: (3a + 15) - (3a + 21) = -6 for every patch.
    intended = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], dtype=float)[None, None]
    out = run(lambda g: g.conv(g.input("x", (None, 1, 5, 5)), g.param("F", value=intended)), {"x": SEED_5X5})
    assert out.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(out, np.full((1, 1, 3, 3), -6.0))

    printed = np.array([[1, 0, 1], [1, 0, -1], [1, 0, -1]], dtype=float)[None, None]
    out = run(lambda g: g.conv(g.const(SEED_5X5), g.const(printed)))
    a = np.array([[1, 2, 3], [6, 7, 8], [11, 12, 13]], dtype=float)
    np.testing.assert_array_equal(out[0, 0], 2 * a - 2)


@covers("conv")
def test_rgb_multichannel_conv_sums_over_the_channel_depth():
    # seeds/001: for an RGB image the kernel is spatially small but extends through all three channels;
    # the output is the sum of the per-channel correlations plus the bias. By hand with R[i,j] = 3i+j+1,
    # G = 10 R, B = 100 R and per-channel 2x2 filters picking R[i,j], G[i,j+1], B[i+1,j+1], bias 1:
    # y[i,j] = R[i,j] + 10 R[i,j+1] + 100 R[i+1,j+1] + 1.
    r = np.arange(1, 10, dtype=float).reshape(3, 3)
    x = np.stack([r, 10 * r, 100 * r])[None]                      # (1, 3, 3, 3)
    w = np.zeros((1, 3, 2, 2))
    w[0, 0, 0, 0] = w[0, 1, 0, 1] = w[0, 2, 1, 1] = 1.0
    out = run(lambda g: g.conv(g.input("x", (None, 3, 3, 3)), g.param("w", value=w), g.param("b", value=[1.0])),
              {"x": x})
    np.testing.assert_array_equal(out[0, 0], [[522, 633], [855, 966]])
    np.testing.assert_allclose(out, naive_conv(x, w, np.array([1.0])), **F64)


@covers("conv")
def test_seed_004_padded_conv_value_179():
    # seeds/004: the 4x4 image zero-padded by 1 and the filter [[1,0,1]]*3; the top-left output is
    # 1*0+0*0+1*0 + 1*0+0*50+1*60 + 1*0+0*180+1*119 = 179.
    img = np.array([[50, 60, 10, 50], [180, 119, 237, 180], [180, 119, 233, 200], [50, 60, 10, 50]], dtype=float)
    f = np.array([[1, 0, 1]] * 3, dtype=float)[None, None]
    out = run(lambda g: g.conv(g.const(img[None, None]), g.const(f), pad=1))
    assert out.shape == (1, 1, 4, 4)                      # P = (F - 1) / 2 keeps the size
    assert out[0, 0, 0, 0] == 179
    np.testing.assert_allclose(out, naive_conv(img[None, None], f, pads=(1, 1, 1, 1)), **F64)


@covers("conv")
@pytest.mark.parametrize("hw,k,stride,pad", [
    ((7, 7), (3, 3), 1, 0), ((7, 7), (3, 3), 2, 1), ((8, 6), (3, 2), (2, 1), (1, 0)), ((227, 227), (11, 11), 4, 0),
    ((27, 27), (5, 5), 1, 2), ((9, 9), (4, 4), 3, 2), ((5, 6), (2, 3), 1, (0, 1)), ((28, 28), (5, 5), 1, "valid")])
def test_conv_output_size_formula_and_values(hw, k, stride, pad):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 2, *hw))
    w = rng.normal(size=(3, 2, *k))
    b = rng.normal(size=3)
    s = (stride, stride) if isinstance(stride, int) else stride
    p = (0, 0) if pad == "valid" else (pad, pad) if isinstance(pad, int) else pad
    expect_hw = tuple((n - f + 2 * pp) // ss + 1 for n, f, pp, ss in zip(hw, k, p, s))   # (W - F + 2P)/S + 1
    g = gc.Graph("t", dtype="float64")
    y = g.conv(g.input("x", (None, 2, *hw)), g.param("w", value=w), g.param("b", value=b), stride=stride, pad=pad)
    assert y.shape == ("N", 3, *expect_hw)
    g.output(y)
    out = gc.compile(g).run({"x": x})[y.name]
    np.testing.assert_allclose(out, naive_conv(x, w, b, s, (p[0], p[0], p[1], p[1])), rtol=1e-10, atol=1e-10)


@covers("conv")
@pytest.mark.parametrize("n,k,s,pads", [
    # Keras/TensorFlow 'same': out = ceil(n / s), total pad = max((out-1)*s + k - n, 0), extra at bottom/right
    (5, 3, 1, (1, 1)), (5, 4, 1, (1, 2)), (6, 2, 1, (0, 1)), (28, 6, 2, (2, 2)), (14, 6, 2, (2, 2)),
    (5, 4, 2, (1, 2)), (7, 2, 2, (0, 1)), (4, 1, 1, (0, 0)), (6, 3, 3, (0, 0))])
def test_conv_same_padding_like_keras_even_kernels_pad_bottom_right(n, k, s, pads):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 1, n, n))
    w = rng.normal(size=(2, 1, k, k))
    g = gc.Graph("t", dtype="float64")
    y = g.conv(g.input("x", (None, 1, n, n)), g.param("w", value=w), stride=s, pad="same", name="y")
    assert g.nx.nodes["y"]["attrs"]["pads"] == (pads[0], pads[1], pads[0], pads[1])
    assert y.shape[2:] == (math.ceil(n / s),) * 2
    g.output(y)
    out = gc.compile(g).run({"x": x})["y"]
    np.testing.assert_allclose(out, naive_conv(x, w, None, (s, s), (pads[0], pads[1], pads[0], pads[1])), **F64)


@covers("conv")
def test_conv_explicit_four_sided_padding():
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(1, 1, 4, 5)), rng.normal(size=(1, 1, 2, 2))
    out = run(lambda g: g.conv(g.const(x), g.const(w), pad=(0, 1, 2, 0)))
    assert out.shape == (1, 1, 4, 6)
    np.testing.assert_allclose(out, naive_conv(x, w, pads=(0, 1, 2, 0)), **F64)


# ================================================================== pooling
SEED_POOL_IN = np.array([[2, 1, -11, 0], [0, 10, -15, -16], [23, 100, 2, 3], [-23, 0, 7, 20]], dtype=float)


@covers("maxpool")
def test_seed_000_maxpool_example():
    out = run(lambda g: g.maxpool(g.input("x", (None, 1, 4, 4)), 2, 2), {"x": SEED_POOL_IN[None, None]})
    assert out.shape == (1, 1, 2, 2)                      # (4 - 2) / 2 + 1 = 2
    np.testing.assert_array_equal(out[0, 0], [[10, 0], [100, 20]])


@covers("maxpool")
def test_seed_002_maxpool_example():
    a2 = np.array([[2, 2, 5, 6], [3, 4, 7, 8], [9, 20, 23, 24], [22, 22, 25, 26]], dtype=float)
    out = run(lambda g: g.maxpool(g.const(a2[None, None]), 2))
    np.testing.assert_array_equal(out[0, 0], [[4, 8], [22, 26]])


@covers("maxpool", "avgpool")
@pytest.mark.parametrize("hw,size,stride", [((4, 4), 2, 2), ((7, 7), 3, 2), ((13, 13), 3, 2), ((6, 5), (2, 3), (1, 2)),
                                            ((5, 5), 2, 3), ((5, 5), 5, 1), ((6, 6), 3, 1)])
def test_pools_match_naive_windows_incl_overlapping(hw, size, stride):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, *hw))
    sz = (size, size) if isinstance(size, int) else size
    st = (stride, stride) if isinstance(stride, int) else stride
    expect_hw = tuple((n - p) // s + 1 for n, p, s in zip(hw, sz, st))          # (W - P) / S + 1
    mx, av = run(lambda g: [g.maxpool(g.input("x", (None, 3, *hw)), size, stride),
                            g.avgpool(g["x"], size, stride)], {"x": x})
    assert mx.shape == av.shape == (2, 3, *expect_hw)
    np.testing.assert_allclose(mx, naive_pool(x, sz, st, np.max), **F64)
    np.testing.assert_allclose(av, naive_pool(x, sz, st, np.mean), **F64)


@covers("maxpool", "pad2d")
def test_padded_maxpool_never_picks_the_padding():
    x = -np.arange(1, 10, dtype=float).reshape(1, 1, 3, 3)     # all negative: a zero pad would win
    out = run(lambda g: g.maxpool(g.const(x), 3, 1, pad=1))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    np.testing.assert_array_equal(out, naive_pool(xp, (3, 3), (1, 1), np.max))
    assert out.max() == -1


@covers("global_avgpool")
def test_global_average_pool():
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    g = gc.Graph("t", dtype="float64")
    y = g.global_avgpool(g.input("x", (None, 3, 4, 5)))
    assert y.shape == ("N", 3)
    g.output(y)
    np.testing.assert_allclose(gc.compile(g).run({"x": x})[y.name], x.mean(axis=(2, 3)), **F64)
    # a 2x2 plane by hand
    out = run(lambda g: g.global_avgpool(g.const(np.array([[[[1.0, 2.0], [3.0, 6.0]]]]))))
    np.testing.assert_array_equal(out, [[3.0]])


# ================================================================== elementwise gates
@covers("add", "mul", "sub", "div", "max", "neg", "copy", "identity")
def test_binary_gates_broadcast_like_numpy():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(2, 3, 4))
    b = rng.normal(size=(3, 1)) + 3.0
    outs = run(lambda g: [g.add(g.const(a), g.const(b)), g.mul("const1", "const2"), g.sub("const1", "const2"),
                          g.div("const1", "const2"), g.max("const1", "const2"), g.neg("const1"),
                          g.copy("const1"), g.identity("const2")])
    for got, want in zip(outs, [a + b, a * b, a - b, a / b, np.maximum(a, b), -a, a, b]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, **F64)


@covers("relu")
def test_relu_seed_001_example():
    out = run(lambda g: g.relu(g.const(np.array([[-478.0, 494.0], [460.0, -477.0]]))))
    np.testing.assert_array_equal(out, [[0, 494], [460, 0]])
    assert run(lambda g: g.relu(g.const(np.array([0.0, -0.0, 1e-300])))).tolist() == [0.0, 0.0, 1e-300]


@covers("exp", "log", "sqrt", "sigmoid", "tanh", "gt")
def test_unary_functions():
    x = np.array([-3.0, -0.5, 0.0, 0.25, 2.0, 40.0])
    p = np.array([0.1, 1.0, 4.0, 9.0])
    e, lg, sq, sg, th, gt = run(lambda g: [g.exp(g.const(x)), g.log(g.const(p)), g.sqrt("const2"),
                                           g.sigmoid("const1"), g.tanh("const1"), g.gt("const1", g.scalar(0.0))])
    np.testing.assert_allclose(e, np.exp(x), **F64)
    np.testing.assert_allclose(lg, np.log(p), **F64)
    np.testing.assert_allclose(sq, [np.sqrt(0.1), 1, 2, 3], **F64)
    np.testing.assert_allclose(sg, 1 / (1 + np.exp(-x)), rtol=1e-12)
    np.testing.assert_allclose(th, np.tanh(x), **F64)
    np.testing.assert_array_equal(gt, [0, 0, 0, 1, 1, 1])
    # sigmoid stays finite and exact at the extremes (no overflow in exp(-x))
    ext = run(lambda g: g.sigmoid(g.const(np.array([-800.0, 800.0]))))
    np.testing.assert_array_equal(ext, [0.0, 1.0])


@covers("cos", "floor")
def test_cos_and_floor():
    x = np.array([-2.5, -1.0, -0.0, 0.0, 0.5, 1.0, 3.999, np.pi])
    c, f = run(lambda g: [g.cos(g.const(x)), g.floor("const1")])
    np.testing.assert_allclose(c, np.cos(x), rtol=1e-15)
    np.testing.assert_array_equal(f, [-3.0, -1.0, -0.0, 0.0, 0.0, 1.0, 3.0, 3.0])


@covers("add", "mul", "input")
def test_seed_001_f_equals_x_plus_y_times_z():
    # seeds/001: f = (x + y) z, "x = -2, y = 5, z = 4", forward f = -12, gradients df/dx = df/dy = -4 and
    # df/dz = q = 3. Those results need z = -4 (the minus sign is lost in the seed's text: with z = 4,
    # f = +12 and df/dx = +4). Both are checked; the seed's printed numbers with z = -4.
    g = gc.Graph("f", dtype="float64")
    x, y, z = (g.input(n, ()) for n in "xyz")
    f = g.mul(g.add(x, y, name="q"), z, name="f")
    g.output(f)
    fwd, bwd = gc.compile(g), gc.compile(gc.grad(g, wrt=["x", "y", "z"]))
    for zv, f_want, grads_want in ((-4.0, -12.0, (-4.0, -4.0, 3.0)), (4.0, 12.0, (4.0, 4.0, 3.0))):
        feeds = {"x": np.array(-2.0), "y": np.array(5.0), "z": np.array(zv)}
        assert fwd.run(feeds)["f"] == f_want
        gr = bwd.run(feeds)
        assert (gr["grad/x"], gr["grad/y"], gr["grad/z"]) == grads_want


@covers("add", "mul", "sigmoid", "sum", "param")
def test_seed_notes_neuron_z_is_one_and_sigmoid_0731():
    # The course notes: z = (x1*w1 + x2*w2) + b with x1=-1, w1=-2, x2=-2, w2=3, b=-3 "gives z = 1.0, sigmoid 0.731".
    # Literally those values give 2 - 6 - 3 = -7; the course figure behind it has the weights' signs the
    # other way (w1 = 2, w2 = -3): -2 + 6 - 3 = 1.0 and sigmoid(1) = 0.731. Both are checked.
    g = gc.Graph("neuron", dtype="float64")
    x = g.input("x", (2,))
    w = g.input("w", (2,))
    b = g.param("b", value=-3.0)
    z = g.add(g.sum(g.mul(x, w)), b, name="z")
    g.output(z, g.sigmoid(z, name="s"))
    exe = gc.compile(g)
    literal = exe.run({"x": np.array([-1.0, -2.0]), "w": np.array([-2.0, 3.0])})
    assert literal["z"] == -7.0
    out = exe.run({"x": np.array([-1.0, -2.0]), "w": np.array([2.0, -3.0])})
    assert out["z"] == 1.0
    assert round(float(out["s"]), 3) == 0.731


# ================================================================== linear algebra and reductions
@covers("matmul")
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transposes(ta, tb):
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    A, B = (a.T.copy() if ta else a), (b.T.copy() if tb else b)
    out = run(lambda g: g.matmul(g.const(A), g.const(B), trans_a=ta, trans_b=tb))
    np.testing.assert_allclose(out, a @ b, **F64)


@covers("matmul", "add")
def test_dense_weights_shaped_out_in_like_torch_linear():
    x = np.array([[1.0, 2.0, 3.0]])
    w = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])                # (out=2, in=3)
    out = run(lambda g: g.dense(g.input("x", (None, 3)), g.param("w", value=w), g.param("b", value=[10.0, 0.0])),
              {"x": x})
    np.testing.assert_allclose(out, [[8.0, 3.0]], **F64)


@covers("sum", "mean")
@pytest.mark.parametrize("axes,keepdims", [(None, False), ((0,), False), ((1, 2), True), (-1, False), ((0, 2), True)])
def test_sum_and_mean(axes, keepdims):
    x = np.arange(24, dtype=float).reshape(2, 3, 4)
    s, m = run(lambda g: [g.sum(g.const(x), axes=axes, keepdims=keepdims),
                          g.mean("const1", axes=axes, keepdims=keepdims)])
    ax = axes if axes is None or isinstance(axes, int) else tuple(axes)
    np.testing.assert_allclose(s, x.sum(axis=ax, keepdims=keepdims), **F64)
    np.testing.assert_allclose(m, x.mean(axis=ax, keepdims=keepdims), **F64)


# ================================================================== shape ops with the symbolic batch dim
@covers("reshape", "transpose", "concat")
def test_reshape_flatten_transpose_concat_with_symbolic_batch():
    g = gc.Graph("t", dtype="float64")
    x = g.input("x", (None, 2, 3, 4))
    z = g.input("z", (None, 3, 3, 4))
    fl = g.flatten(x, name="fl")
    rs = g.reshape(x, (None, 6, -1), name="rs")
    tr = g.transpose(x, (0, 2, 3, 1), name="tr")
    cc = g.concat([x, z], axis=1, name="cc")
    assert fl.shape == ("N", 24) and rs.shape == ("N", 6, 4) and tr.shape == ("N", 3, 4, 2)
    assert cc.shape == ("N", 5, 3, 4)
    g.output(fl, rs, tr, cc)
    exe = gc.compile(g)
    for batch in (1, 3):            # one executable, any batch size
        xv = np.arange(batch * 24, dtype=float).reshape(batch, 2, 3, 4)
        zv = -np.arange(batch * 36, dtype=float).reshape(batch, 3, 3, 4)
        out = exe.run({"x": xv, "z": zv})
        np.testing.assert_array_equal(out["fl"], xv.reshape(batch, 24))
        np.testing.assert_array_equal(out["rs"], xv.reshape(batch, 6, 4))
        np.testing.assert_array_equal(out["tr"], xv.transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(out["cc"], np.concatenate([xv, zv], axis=1))


@covers("transpose")
def test_transpose_default_reverses_axes():
    x = np.arange(6, dtype=float).reshape(2, 3)
    np.testing.assert_array_equal(run(lambda g: g.transpose(g.const(x))), x.T)


@covers("concat")
def test_concat_inception_style_channels():
    parts = [np.full((1, c, 2, 2), float(c)) for c in (1, 2, 3)]
    out = run(lambda g: g.concat([g.const(p) for p in parts], axis=1))
    assert out.shape == (1, 6, 2, 2)
    np.testing.assert_array_equal(out[0, :, 0, 0], [1, 2, 2, 3, 3, 3])


@covers("slice", "unslice", "pad2d", "crop2d", "reshape_like")
def test_slice_unslice_pad_crop_reshape_like():
    x = np.arange(2 * 5 * 2 * 3, dtype=float).reshape(2, 5, 2, 3)
    sl, un, pd, cr, rl = run(lambda g: [
        g.slice(g.const(x), axis=1, start=1, stop=3),
        g.unslice(g.const(np.ones((2, 2, 2, 3))), g.const(np.zeros((2, 5, 2, 3))), axis=1, start=3),
        g.pad2d("const1", (1, 0, 0, 2), value=7.0),
        g.crop2d("const1", (1, 0, 1, 1)),
        g.reshape_like(g.const(np.arange(6.0)), g.const(np.zeros((3, 2))))])
    np.testing.assert_array_equal(sl, x[:, 1:3])
    want = np.zeros((2, 5, 2, 3))
    want[:, 3:5] = 1
    np.testing.assert_array_equal(un, want)
    np.testing.assert_array_equal(pd, np.pad(x, ((0, 0), (0, 0), (1, 0), (0, 2)), constant_values=7.0))
    np.testing.assert_array_equal(cr, x[:, :, 1:, 1:2])
    np.testing.assert_array_equal(rl, np.arange(6.0).reshape(3, 2))


@covers("broadcast_like", "sum_to", "expand_like")
def test_broadcast_helpers():
    like = np.zeros((2, 3, 4))
    bl, blm, bk, st, ex = run(lambda g: [
        g.broadcast_like(g.const(np.array([1.0, 2.0, 3.0])), g.const(like), axes=(0, 2), keepdims=False),
        g.broadcast_like(g.scalar(12.0), "const2", axes=(0, 1, 2), keepdims=False, mean=True),
        g.broadcast_like(g.const(np.ones((2, 1, 4))), "const2", axes=(1,), keepdims=True),
        g.sum_to(g.const(np.ones((2, 3, 4))), g.const(np.zeros((3, 1)))),
        g.expand_like(g.const(np.array([1.0, 2.0, 3.0, 4.0])), "const2")])
    np.testing.assert_array_equal(bl, np.broadcast_to(np.array([1.0, 2.0, 3.0])[None, :, None], (2, 3, 4)))
    np.testing.assert_array_equal(blm, np.full((2, 3, 4), 0.5))          # 12 / 24 elements
    np.testing.assert_array_equal(bk, np.ones((2, 3, 4)))
    np.testing.assert_array_equal(st, np.full((3, 1), 8.0))                 # summed over 2 and 4
    np.testing.assert_array_equal(ex, np.broadcast_to([1.0, 2.0, 3.0, 4.0], (2, 3, 4)))


# ================================================================== softmax and losses
@covers("softmax")
def test_seed_000_softmax_of_3_minus2_minus100():
    x = np.array([3.0, -2.0, -100.0])
    out = run(lambda g: g.softmax(g.const(x)))
    denom = math.exp(3) + math.exp(-2) + math.exp(-100)
    assert round(denom, 2) == 20.22
    assert round(out[0], 2) == 0.99
    assert out[1] == pytest.approx(0.0066, abs=1e-4)       # e^-2 / 20.22 = 0.00669 (the seed truncates)
    # e^-100 / 20.22 = 1.840e-45 exactly; the seed prints 1.88e-45 ("close to zero"), ~2% off.
    assert out[2] == pytest.approx(math.exp(-100) / denom, rel=1e-10)
    assert out[2] == pytest.approx(1.88e-45, rel=0.03)
    assert out.sum() == pytest.approx(1.0, rel=1e-12)


@covers("softmax")
def test_softmax_axis_and_stability():
    x = np.array([[1000.0, 1001.0], [0.0, 0.0]])
    rows = run(lambda g: g.softmax(g.const(x), axis=1))
    np.testing.assert_allclose(rows, [[1 / (1 + math.e), math.e / (1 + math.e)], [0.5, 0.5]], **F64)
    cols = run(lambda g: g.softmax(g.const(np.array([[0.0, 1.0], [0.0, 1.0]])), axis=0))
    np.testing.assert_allclose(cols, np.full((2, 2), 0.5), **F64)


LOGITS = np.array([[2.0, 1.0, 0.1], [0.5, -1.0, 3.0], [0.0, 0.0, 0.0], [1.0, 2.0, -2.0]])
LABELS = np.array([0, 2, 1, 1])


def _naive_ce(z, labels):
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return -np.mean(np.log(p[np.arange(len(labels)), labels]))


@covers("softmax_cross_entropy", "cross_entropy", "softmax")
def test_softmax_cross_entropy_int_and_one_hot_labels_and_cross_entropy():
    want = _naive_ce(LOGITS, LABELS)
    gi = gc.Graph("ce", dtype="float64")
    z = gi.input("z", (None, 3))
    yi = gi.input("labels", (None,), dtype="int64")
    y1 = gi.input("onehot", (None, 3))
    gi.output(gi.softmax_cross_entropy(z, yi, name="sce_int"), gi.softmax_cross_entropy(z, y1, name="sce_1h"),
              gi.cross_entropy(gi.softmax(z), yi, name="ce_int"), gi.cross_entropy(gi.softmax(z), y1, name="ce_1h"))
    out = gc.compile(gi).run({"z": LOGITS, "labels": LABELS, "onehot": np.eye(3)[LABELS]})
    for k in ("sce_int", "sce_1h", "ce_int", "ce_1h"):
        assert out[k].shape == ()
        assert out[k] == pytest.approx(want, rel=1e-12), k
    # the seed CNN's logits [1.042, 1.914] against (1, 0): -log(0.295) = 1.2213
    sce = run(lambda g: g.softmax_cross_entropy(g.const(np.array([[1.042, 1.914]])), g.const(np.array([0]))))
    assert sce == pytest.approx(1.2213, abs=1e-4)


@covers("mse")
def test_mse():
    p = np.array([[1.0, 2.0], [3.0, 4.0]])
    t = np.array([[0.0, 2.0], [5.0, 4.5]])
    out = run(lambda g: g.mse(g.const(p), g.const(t)))
    assert out == pytest.approx((1 + 0 + 4 + 0.25) / 4, rel=1e-12)


@covers("bce_with_sigmoid")
def test_bce_with_sigmoid_matches_naive_formula_and_is_stable():
    z = np.array([[0.3, -1.2], [2.5, 0.0], [-0.7, 4.0]])
    t = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    a = 1 / (1 + np.exp(-z))
    naive = np.mean(-t * np.log(a) - (1 - t) * np.log(1 - a))     # seeds/002's L = 1/m sum[...]
    assert run(lambda g: g.bce_with_sigmoid(g.const(z), g.const(t))) == pytest.approx(naive, rel=1e-12)
    # large logits: log(sigmoid) computed without overflow
    big = run(lambda g: g.bce_with_sigmoid(g.const(np.array([800.0, -800.0])), g.const(np.array([0.0, 1.0]))))
    assert big == pytest.approx(800.0, rel=1e-12)


@covers("softmax_ce_grad", "cross_entropy_grad", "mse_grad", "bce_grad")
def test_loss_gradient_ops():
    m = LOGITS.shape[0]
    y = np.eye(3)[LABELS]
    p = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
    a, b = np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[0.0, 2.0], [4.0, 1.0]])
    sce, ce, ms, bc = run(lambda g: [
        g.softmax_ce_grad(g.const(LOGITS), g.const(LABELS), g.scalar(2.0)),
        g.cross_entropy_grad(g.const(p), g.const(y), g.scalar(2.0)),
        g.mse_grad(g.const(a), g.const(b), g.scalar(2.0)),
        g.bce_grad(g.const(a), g.const(b), g.scalar(2.0))])
    np.testing.assert_allclose(sce, (p - y) / m * 2.0, **F64)                 # the collapsed rule (O - y)/m
    np.testing.assert_allclose(ce, -y / p / m * 2.0, **F64)
    np.testing.assert_allclose(ms, 2 * (a - b) / 4 * 2.0, **F64)
    np.testing.assert_allclose(bc, (1 / (1 + np.exp(-a)) - b) / 4 * 2.0, **F64)


# ================================================================== dropout
@covers("dropout_mask", "mul")
def test_dropout_identity_at_inference_and_seeded_mask_in_training():
    rate = 0.3
    g = gc.Graph("d", dtype="float64")
    x = g.input("x", (None, 100, 100))
    g.output(g.dropout(x, rate, seed=7, name="d"))
    g2 = gc.Graph("d", dtype="float64")
    g2.output(g2.dropout(g2.input("x", (None, 100, 100)), rate, seed=8, name="d"))
    exe, exe2 = gc.compile(g), gc.compile(g2)
    xv = np.random.default_rng(0).uniform(1.0, 2.0, size=(2, 100, 100))

    np.testing.assert_array_equal(exe.run({"x": xv})["d"], xv)            # inference: identity

    out = exe.run({"x": xv}, training=True)["d"]
    kept = out != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01                            # keep rate 1 - rate
    np.testing.assert_allclose(out[kept], xv[kept] / (1 - rate), **F64)           # inverted-dropout scale
    assert np.abs(out.mean() - xv.mean()) < 0.02                           # expectation preserved
    np.testing.assert_array_equal(exe.run({"x": xv}, training=True)["d"], out)   # same (seed, step): same mask
    assert (exe2.run({"x": xv}, training=True)["d"] != out).any()         # another seed: another mask
    mask = run(lambda g: g.dropout(g.const(np.ones((3, 3))), 0.0), training=True)
    np.testing.assert_array_equal(mask, np.ones((3, 3)))                  # rate 0: identity even in training


# ================================================================== backward-only ops of the table
@covers("conv_dx", "conv_dw")
@pytest.mark.parametrize("stride,pads", [((1, 1), (0, 0, 0, 0)), ((2, 2), (1, 1, 1, 1)), ((2, 1), (0, 1, 2, 0)),
                                         ((3, 3), (0, 0, 0, 0))])
def test_conv_dx_and_dw_are_the_transposes_of_conv(stride, pads):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 7, 6))
    w = rng.normal(size=(4, 3, 3, 2))
    y = naive_conv(x, w, None, stride, pads)
    dy = rng.normal(size=y.shape)
    # by the definition: y[n,k,i,j] += w[k,c,u,v] * xp[n,c,i*s+u,j*s+v]
    t, b, le, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (le, r)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            sl = (slice(None), slice(None),
                  slice(i * stride[0], i * stride[0] + 3), slice(j * stride[1], j * stride[1] + 2))
            dxp[sl] += np.einsum("nk,kchw->nchw", dy[:, :, i, j], w)
            dw += np.einsum("nk,nchw->kchw", dy[:, :, i, j], xp[sl])
    dx = dxp[:, :, t:t + 7, le:le + 6]
    gdx, gdw = run(lambda g: [g.conv_dx(g.const(dy), g.const(w), stride, pads, (7, 6)),
                              g.conv_dw(g.const(x), "const1", stride, pads, (3, 2))])
    np.testing.assert_allclose(gdx, dx, atol=1e-12)
    np.testing.assert_allclose(gdw, dw, atol=1e-12)


@covers("maxpool_route", "maxpool_gather")
def test_maxpool_route_and_gather():
    # seeds/000: x_conv = [[1,3],[2,4]] pools to [4]; delta_maxpool = [10] routes to delta_conv = [[0,0],[0,10]]
    x = np.array([[[[1.0, 3.0], [2.0, 4.0]]]])
    out = run(lambda g: g.maxpool_route(g.const(x), g.const(np.array([[[[10.0]]]])), (2, 2), (2, 2)))
    np.testing.assert_array_equal(out[0, 0], [[0, 0], [0, 10]])
    # overlapping windows (size 2, stride 1) accumulate: the centre max of a 3x3 wins all four windows
    x3 = np.array([[[[0.0, 1.0, 0.0], [1.0, 9.0, 1.0], [0.0, 1.0, 0.0]]]])
    dy = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    route, gather = run(lambda g: [g.maxpool_route(g.const(x3), g.const(dy), 2, 1),
                                   g.maxpool_gather("const1", g.const(np.arange(9.0).reshape(1, 1, 3, 3)), 2, 1)])
    want = np.zeros((1, 1, 3, 3))
    want[0, 0, 1, 1] = 10.0
    np.testing.assert_array_equal(route, want)
    np.testing.assert_array_equal(gather, np.full((1, 1, 2, 2), 4.0))    # g at the argmax (index 4)


@covers("avgpool_spread", "global_avgpool_spread")
def test_average_pool_spreads():
    dy = np.array([[[[4.0, 8.0]]]])
    sp = run(lambda g: g.avgpool_spread(g.const(dy), 2, 1, (2, 3)))       # overlapping: middle column gets both
    np.testing.assert_array_equal(sp[0, 0], [[1, 3, 2], [1, 3, 2]])
    gsp = run(lambda g: g.global_avgpool_spread(g.const(np.array([[8.0, 4.0]])), g.const(np.zeros((1, 2, 2, 2)))))
    np.testing.assert_array_equal(gsp, np.stack([np.full((2, 2), 2.0), np.full((2, 2), 1.0)])[None])


@covers("maxpool_argmax", "route_scatter")
def test_saved_route_ops():
    # four 2x2 windows: a clear max; a max of exactly 0 (a ReLU output's zero) tied at two positions;
    # a positive plateau (every position ties); an all-negative window
    x = np.array([[[[1.0, 3.0, 0.0, -2.0, 2.0, 2.0, -1.0, -2.0],
                    [2.0, 4.0, -3.0, 0.0, 2.0, 2.0, -3.0, -4.0]]]])
    g = gc.Graph("t", dtype="float64")
    xv = g.const(x)
    r = g.add_node("maxpool_argmax", (xv,), {"size": (2, 2), "stride": (2, 2), "relu": False}, name="r")
    rr = g.add_node("maxpool_argmax", (xv,), {"size": (2, 2), "stride": (2, 2), "relu": True}, name="rr")
    dy = g.const(np.array([[[[10.0, 5.0, 7.0, 3.0]]]]))
    dx = g.add_node("route_scatter", (dy, rr), {"in_hw": (2, 8)}, name="dx")
    dxr = g.add_node("route_scatter", (dy, r), {"in_hw": (2, 8)}, name="dxr")
    g.output(r, rr, dx, dxr)
    out = gc.compile(g).run({})
    # flat index i*W + j (W = 8) of each window's FIRST max in row-major order: 4 at (1,1); the 0 at (0,2)
    # before the 0 at (1,3); the plateau's top-left (0,4); -1 at (0,6)
    np.testing.assert_array_equal(out["r"], [[[[9, 2, 4, 6]]]])
    # relu=True: a window whose max is <= 0 -- exactly 0 included -- is masked: ~ its first max (< 0)
    np.testing.assert_array_equal(out["rr"], [[[[9, ~2, 4, ~6]]]])
    want = np.zeros((1, 1, 2, 8))
    want[0, 0, 1, 1], want[0, 0, 0, 4] = 10.0, 7.0
    np.testing.assert_array_equal(out["dx"], want)                   # masked: dy * 0 there
    want[0, 0, 0, 2], want[0, 0, 0, 6] = 5.0, 3.0
    np.testing.assert_array_equal(out["dxr"], want)


# ================================================================== the table is covered
def test_every_op_has_a_reference_test(request):
    """Last in the file, so the tests it counts have run. A skipped test covers nothing."""
    from graphc.ops.elementwise import CUSTOM        # ops other tests declare as a user would
    import test_ops_cnn              # the CNN op set (batch norm, LRN, grouped conv, ...) is tested there
    import test_distributed          # the collectives (allreduce) are tested there
    missing = sorted(set(OPS) - set(COVERS) - test_ops_cnn.COVERED - test_distributed.COVERED - CONTAINERS - CUSTOM)
    assert not missing, f"ops with no reference-semantics test in tests/test_ops.py or test_ops_cnn.py: {missing}"
    selected = {it.originalname for it in request.session.items if it.module is request.module}
    ops = {op: tests for op, tests in COVERS.items() if op in OPS}
    unpassed = sorted(op for op, tests in ops.items() if tests & selected and not tests & PASSED)
    assert not unpassed, f"ops whose every reference test was skipped or failed in this run: {unpassed}"
    unrun = sorted(op for op, tests in ops.items() if not tests & selected)
    if unrun:
        pytest.skip(f"the reference tests of {unrun} were not selected: run the whole file to check coverage")
