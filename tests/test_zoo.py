"""The model zoo: gc.summary's shapes and parameter counts (checked by hand with the course's formulas,
and against torchvision's published counts for its ImageNet models), and every small model's forward
pass on the reference backend, checked against the numba backend (the ImageNet models run at 64x64 in
tests/test_zoo_imagenet.py)."""
import re

import numpy as np
import pytest

import graphc as gc
from graphc import models, shapes
from graphc.summarize import param_count

ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\(.*?\))\s+([\d,]+)(?:\s.*)?$")   # then param bytes, MACs, activations


def conv_params(k, c, n):
    """The course notes: a conv layer has K*K*C*N weights + N biases."""
    return k * k * c * n + n


def bn_params(n):
    """A batch norm has a scale and a shift per channel (its running statistics are state, not parameters)."""
    return 2 * n


def fc_params(i, o):
    """The course notes: a fully connected layer has inputs x outputs weights + outputs biases."""
    return i * o + o


def out_size(w, f, p=0, s=1):
    """(W - F + 2P) / S + 1 for conv, (W - P) / S + 1 for pooling (p = 0)."""
    return (w - f + 2 * p) // s + 1


# Totals by hand (layer by layer with the formulas above).
TOTALS = {
    "alexnet": 62_378_344,
    "vgg16": 138_357_544,
    "mnist_convnet": conv_params(3, 1, 32) + conv_params(3, 32, 64) + fc_params(5 * 5 * 64, 10),        # 34,826
    "lenet5": conv_params(5, 1, 6) + conv_params(5, 6, 16) + fc_params(16 * 5 * 5, 120) + fc_params(120, 84)
    + fc_params(84, 10),                                                                              # 61,706
    "mlp": fc_params(784, 16) + fc_params(16, 16) + fc_params(16, 10),                                # 13,002
    "codelab_cnn": conv_params(3, 1, 12) + conv_params(6, 12, 24) + conv_params(6, 24, 32)
    + fc_params(7 * 7 * 32, 200) + fc_params(200, 10),                                                # 354,002
    "resnet_block": conv_params(3, 4, 8) + conv_params(3, 8, 8) + conv_params(1, 4, 8) + fc_params(8, 10),
    # with batch norm: convs without biases (conv_params - n), one BN after each
    "resnet": sum(conv_params(k, c, n) - n + bn_params(n) for k, c, n in (
        (3, 1, 16), (3, 16, 16), (3, 16, 16), (3, 16, 32), (3, 32, 32), (1, 16, 32),
        (3, 32, 64), (3, 64, 64), (1, 32, 64))) + fc_params(64, 10),
    # inception(c1, c3r, c3, c5r, c5, pool_proj) on C input channels
    "inception_block": (conv_params(1, 4, 4) + conv_params(1, 4, 4) + conv_params(3, 4, 8) + conv_params(1, 4, 2)
                        + conv_params(5, 2, 4) + conv_params(1, 4, 4) + fc_params(4 + 8 + 4 + 4, 10)),
    "inception": (conv_params(3, 1, 16)
                  + conv_params(1, 16, 8) + conv_params(1, 16, 8) + conv_params(3, 8, 16) + conv_params(1, 16, 4)
                  + conv_params(5, 4, 8) + conv_params(1, 16, 8)
                  + conv_params(1, 40, 16) + conv_params(1, 40, 16) + conv_params(3, 16, 32) + conv_params(1, 40, 8)
                  + conv_params(5, 8, 16) + conv_params(1, 40, 16) + fc_params(80, 10)),
    "seed_cnn": conv_params(2, 1, 1) + fc_params(4, 2) + fc_params(2, 2),                             # 21
    # torchvision's published counts ("num_params" of each model's IMAGENET1K_V1 weights in
    # torchvision.models; googlenet without its auxiliary heads)
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872,
    "googlenet": 6_624_904, "vgg16_bn": 138_365_992, "squeezenet1_0": 1_248_424,
    # the paper's GoogLeNet: convs with biases, true 5x5 branches, no BN; the same blocks as torchvision's
    "googlenet_lrn": (conv_params(7, 3, 64) + conv_params(1, 64, 64) + conv_params(3, 64, 192)
                      + sum(conv_params(1, c, a) + conv_params(1, c, b) + conv_params(3, b, d)
                            + conv_params(1, c, e) + conv_params(5, e, f) + conv_params(1, c, p)
                            for c, (a, b, d, e, f, p) in zip(
                                (192, 256, 480, 512, 512, 512, 528, 832, 832),
                                ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), (192, 96, 208, 16, 48, 64),
                                 (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
                                 (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128),
                                 (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))))
                      + fc_params(1024, 1000)),                                                      # 6,998,552
}

# Output shapes by hand, a few per model (batch dim N).
SHAPES = {
    "mlp": {"flatten": ("N", 784), "fc1.relu": ("N", 16), "fc2.relu": ("N", 16), "logits": ("N", 10)},
    "lenet5": {"c1": ("N", 6, 28, 28), "s2": ("N", 6, 14, 14), "c3": ("N", 16, 10, 10), "s4": ("N", 16, 5, 5),
               "flatten": ("N", 400), "f5": ("N", 120), "f6": ("N", 84), "logits": ("N", 10)},
    "mnist_convnet": {"conv1": ("N", 32, 26, 26), "pool1": ("N", 32, 13, 13), "conv2": ("N", 64, 11, 11),
                      "pool2": ("N", 64, 5, 5), "flatten": ("N", 1600), "logits": ("N", 10)},
    "codelab_cnn": {"conv1": ("N", 12, 28, 28), "conv2": ("N", 24, 14, 14), "conv3": ("N", 32, 7, 7),
                    "flatten": ("N", 1568), "fc1": ("N", 200), "logits": ("N", 10)},
    "resnet_block": {"res1.conv1": ("N", 8, 8, 8), "res1.proj": ("N", 8, 8, 8), "res1.join": ("N", 8, 8, 8),
                     "gap": ("N", 8), "logits": ("N", 10)},
    "resnet": {"stem": ("N", 16, 28, 28), "res1.out": ("N", 16, 28, 28), "res2.out": ("N", 32, 14, 14),
               "res3.out": ("N", 64, 7, 7), "gap": ("N", 64), "logits": ("N", 10)},
    "inception_block": {"inc1.concat": ("N", 20, 8, 8), "gap": ("N", 20), "logits": ("N", 10)},
    "inception": {"stem.pool": ("N", 16, 14, 14), "inc1.concat": ("N", 40, 14, 14), "pool2": ("N", 40, 7, 7),
                  "inc2.concat": ("N", 80, 7, 7), "gap": ("N", 80), "logits": ("N", 10)},
    "seed_cnn": {"conv": ("N", 1, 2, 2), "flatten": ("N", 4), "h": ("N", 2), "logits": ("N", 2)},
    "alexnet": {"conv1": ("N", 96, 55, 55), "pool1": ("N", 96, 27, 27), "conv2": ("N", 256, 27, 27),
                "pool2": ("N", 256, 13, 13), "conv3": ("N", 384, 13, 13), "conv4": ("N", 384, 13, 13),
                "conv5": ("N", 256, 13, 13), "pool5": ("N", 256, 6, 6), "flatten": ("N", 9216),
                "fc6": ("N", 4096), "fc7": ("N", 4096), "logits": ("N", 1000)},
    "resnet18": {"maxpool": ("N", 64, 56, 56), "layer1.1.out": ("N", 64, 56, 56), "layer2.0.out": ("N", 128, 28, 28),
                 "layer4.1.out": ("N", 512, 7, 7), "avgpool": ("N", 512), "logits": ("N", 1000)},
    "resnet34": {"layer3.5.out": ("N", 256, 14, 14), "layer4.2.out": ("N", 512, 7, 7), "logits": ("N", 1000)},
    "resnet50": {"layer1.0.conv3": ("N", 256, 56, 56), "layer4.2.out": ("N", 2048, 7, 7), "avgpool": ("N", 2048)},
    "mobilenet_v2": {"features.0.2": ("N", 32, 112, 112), "features.1.conv.2": ("N", 16, 112, 112),
                     "features.17.conv.3": ("N", 320, 7, 7), "features.18.2": ("N", 1280, 7, 7),
                     "logits": ("N", 1000)},
    "googlenet": {"maxpool1": ("N", 64, 56, 56), "maxpool2": ("N", 192, 28, 28), "inception3a": ("N", 256, 28, 28),
                  "maxpool3": ("N", 480, 14, 14), "inception4e": ("N", 832, 14, 14), "maxpool4": ("N", 832, 7, 7),
                  "inception5b": ("N", 1024, 7, 7), "logits": ("N", 1000)},
    "googlenet_lrn": {"pool1": ("N", 64, 56, 56), "norm2": ("N", 192, 56, 56), "pool2": ("N", 192, 28, 28),
                      "inception4e": ("N", 832, 14, 14), "inception5b": ("N", 1024, 7, 7)},
    "vgg16_bn": {"features.0": ("N", 64, 224, 224), "features.6": ("N", 64, 112, 112),
                 "features.43": ("N", 512, 7, 7), "flatten": ("N", 25088), "logits": ("N", 1000)},
    "squeezenet1_0": {"features.0": ("N", 96, 109, 109), "features.2": ("N", 96, 54, 54), "features.3": ("N", 128, 54, 54),
                      "features.6": ("N", 256, 27, 27), "features.11": ("N", 512, 13, 13), "logits": ("N", 1000)},
    "vgg16": {"conv1_2": ("N", 64, 224, 224), "pool1": ("N", 64, 112, 112), "pool2": ("N", 128, 56, 56),
              "pool3": ("N", 256, 28, 28), "pool4": ("N", 512, 14, 14), "conv5_3": ("N", 512, 14, 14),
              "pool5": ("N", 512, 7, 7), "flatten": ("N", 25088), "fc6": ("N", 4096), "logits": ("N", 1000)},
}

IMAGENET = {"resnet18", "resnet34", "resnet50", "mobilenet_v2", "googlenet", "googlenet_lrn", "vgg16_bn",
            "squeezenet1_0"}
SMALL = [n for n in models.names() if n not in {"alexnet", "vgg16"} | IMAGENET]


def parse_summary(text):
    rows, total = {}, None
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3), int(m.group(4).replace(",", "")))
        if line.startswith("total trainable parameters:"):
            total = int(line.split(":")[1].replace(",", ""))
    return rows, total


@pytest.fixture(scope="module")
def graphs():
    return {n: models.load(n) for n in models.names()}


def test_every_zoo_model_is_checked():
    assert set(models.names()) == set(TOTALS) == set(SHAPES)
    for n in ("mlp", "lenet5", "mnist_convnet", "codelab_cnn", "alexnet", "vgg16", "resnet_block", "resnet",
              "inception_block", "seed_cnn"):
        assert n in models.names()


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_summary_shapes_and_parameter_counts(graphs, name):
    g = graphs[name]
    text = gc.summary(g)
    rows, total = parse_summary(text)
    assert total == TOTALS[name] == param_count(g)
    ops = [n for n in g.topo() if g.nx.nodes[n]["op"] not in ("param", "const")]
    assert list(rows) == ops                               # one row per op, in order
    trainable = set(g.param_names)
    for n, (op, shp, count) in rows.items():
        d = g.nx.nodes[n]
        assert op == d["op"]
        assert shp == shapes.fmt(d["shape"])
        assert count == sum(int(np.prod(g.nx.nodes[i]["shape"])) for i in d["inputs"] if i in trainable)
    assert sum(c for _, _, c in rows.values()) == total
    for n, want in SHAPES[name].items():
        assert g.nx.nodes[n]["shape"] == want, n
        assert rows[n][1] == shapes.fmt(want)


def _layer_params(rows, layer):
    """A conv row holds its weights and bias; a dense layer is a matmul row plus a bias-add row."""
    return sum(c for n, (_, _, c) in rows.items() if n == layer or n == f"{layer}.matmul")


def test_alexnet_per_layer_by_hand(graphs):
    rows, total = parse_summary(gc.summary(graphs["alexnet"]))
    s1 = out_size(227, 11, 0, 4)            # 55
    p1 = out_size(s1, 3, 0, 2)              # 27
    s2 = out_size(p1, 5, 2, 1)              # 27
    p2 = out_size(s2, 3, 0, 2)              # 13
    s3 = out_size(p2, 3, 1, 1)              # 13
    p5 = out_size(s3, 3, 0, 2)              # 6
    assert (s1, p1, s2, p2, s3, p5) == (55, 27, 27, 13, 13, 6)
    layers = {
        "conv1": (conv_params(11, 3, 96), f"(N, 96, {s1}, {s1})"),
        "conv2": (conv_params(5, 96, 256), f"(N, 256, {s2}, {s2})"),
        "conv3": (conv_params(3, 256, 384), f"(N, 384, {s3}, {s3})"),
        "conv4": (conv_params(3, 384, 384), f"(N, 384, {s3}, {s3})"),
        "conv5": (conv_params(3, 384, 256), f"(N, 256, {s3}, {s3})"),
        "fc6": (fc_params(p5 * p5 * 256, 4096), "(N, 4096)"),
        "fc7": (fc_params(4096, 4096), "(N, 4096)"),
        "logits": (fc_params(4096, 1000), "(N, 1000)"),
    }
    assert {k: v[0] for k, v in layers.items()} == {
        "conv1": 34_944, "conv2": 614_656, "conv3": 885_120, "conv4": 1_327_488, "conv5": 884_992,
        "fc6": 37_752_832, "fc7": 16_781_312, "logits": 4_097_000}
    for layer, (n_params, shp) in layers.items():
        assert _layer_params(rows, layer) == n_params, layer
        assert rows[layer][1] == shp, layer
    for pool, hw in (("pool1", p1), ("pool2", p2), ("pool5", p5)):
        assert rows[pool][2] == 0                     # pooling: no parameters
        assert rows[pool][1].endswith(f", {hw}, {hw})")
    assert sum(v[0] for v in layers.values()) == total == 62_378_344


def test_vgg16_per_layer_by_hand(graphs):
    rows, total = parse_summary(gc.summary(graphs["vgg16"]))
    c_in, hw, expect = 3, 224, 0
    for block, (n_convs, ch) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], 1):
        for layer in range(1, n_convs + 1):
            name = f"conv{block}_{layer}"
            assert _layer_params(rows, name) == conv_params(3, c_in, ch), name
            assert rows[name][1] == f"(N, {ch}, {hw}, {hw})"           # 3x3 stride 1 pad 1 keeps the size
            expect += conv_params(3, c_in, ch)
            c_in = ch
        hw = out_size(hw, 2, 0, 2)
        assert rows[f"pool{block}"][1] == f"(N, {ch}, {hw}, {hw})" and rows[f"pool{block}"][2] == 0
    for name, (i, o) in {"fc6": (7 * 7 * 512, 4096), "fc7": (4096, 4096), "logits": (4096, 1000)}.items():
        assert _layer_params(rows, name) == fc_params(i, o)
        expect += fc_params(i, o)
    assert expect == total == 138_357_544


def _feeds(g, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for n in g.inputs:
        d = g.nx.nodes[n]
        shape = tuple(batch if isinstance(s, str) else s for s in d["shape"])
        if d["dtype"].startswith("int"):
            feeds[n] = rng.integers(0, 2, size=shape)
        else:
            feeds[n] = rng.normal(size=shape).astype(d["dtype"])
    return feeds


@pytest.fixture(scope="module")
def _im2col_convs():
    """One set of conv kernels for every shape (no per-shape strategy timing, no generated direct
    kernels): the numba forward of the zoo stays quick."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CONV_STRATEGY", "im2col")
    yield
    mp.undo()


def _softmax_ce(logits, labels):
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean()


@pytest.mark.parametrize("name", SMALL)
def test_forward_at_batch_2_matches_numba_and_loss_matches_logits(graphs, name, _im2col_convs):
    """The reference forward against a second implementation of every op (the numba backend, fused) and
    its loss against softmax cross-entropy recomputed from its logits here."""
    g = graphs[name]
    feeds = _feeds(g)
    ref = gc.compile(g, backend="reference", keep=["logits"])
    out = ref.run(feeds, outputs=["loss", "logits"])
    n_classes = 2 if name == "seed_cnn" else 10
    assert out["loss"].shape == () and out["logits"].shape == (2, n_classes)
    tol = dict(rtol=1e-10, atol=1e-12) if g.dtype == "float64" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["loss"], _softmax_ce(out["logits"], feeds["labels"]), **tol)
    got = gc.compile(g, backend="numba", keep=["logits"]).run(feeds, outputs=["loss", "logits"])
    for k in ("logits", "loss"):
        np.testing.assert_allclose(got[k], out[k], err_msg=f"{name}: {k}", **tol)
    if any(g.nx.nodes[n]["op"] == "dropout_mask" for n in g.nx.nodes):
        train = ref.run(feeds, outputs=["loss"], training=True)["loss"]
        assert np.isfinite(train) and train != out["loss"]       # the mask is on in training only


def test_models_without_loss_output_logits():
    g = models.lenet5(loss=False)
    assert g.inputs == ["x"] and g.outputs == ["logits"]
    out = gc.compile(g).run({"x": np.zeros((3, 1, 28, 28), np.float32)})
    assert out["logits"].shape == (3, 10)


def test_seed_cnn_forward_values():
    g = models.seed_cnn()
    out = gc.compile(g, keep=["C", "h", "logits"]).run({"x": models.SEED_X, "labels": models.SEED_LABELS},
                                                      outputs=["C", "h", "logits", "loss"])
    f64 = dict(rtol=1e-10, atol=1e-12)         # a float64 graph, and these values are exact decimals
    np.testing.assert_allclose(out["C"].reshape(-1), [1.9, 0.3, 0.3, 1.9], **f64)
    np.testing.assert_allclose(out["h"], [[1.3, 3.06]], **f64)
    np.testing.assert_allclose(out["logits"], [[1.042, 1.914]], **f64)
    assert out["loss"] == pytest.approx(-np.log(0.295), abs=2e-3)


def test_zoo_load_by_name_and_file(tmp_path):
    assert models.load("mlp").name == "mlp"
    f = tmp_path / "my_model.py"
    f.write_text("import graphc as gc\n"
                 "def build():\n"
                 "    g = gc.Graph('mine')\n"
                 "    x = g.input('x', (None, 4))\n"
                 "    g.output(g.sum(g.dense(x, g.param('w', (2, 4))), name='s'))\n"
                 "    return g\n")
    g = models.load(f"{f}:build")
    assert g.name == "mine" and "total trainable parameters: 8" in gc.summary(g)
    with pytest.raises(gc.GraphError) as e:
        models.load("nosuchnet")
    assert "lenet5" in str(e.value)
