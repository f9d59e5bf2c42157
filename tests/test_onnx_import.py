"""gc.onnx.load on hand-built models: every attribute honoured (checked against onnxruntime), exporter
patterns folded, the symbolic batch dim, errors that name node/op/attribute, training a loaded model."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphc as gc  # noqa: E402
from graphc.onnx import OnnxError, UnsupportedOnnx  # noqa: E402
from graphc.onnx.peer import run_onnxruntime  # noqa: E402
from graphc.onnx.registry import graph_has  # noqa: E402

F = TensorProto.FLOAT


def model(nodes, inputs, outputs, inits=(), opset=17):
    """inputs/outputs: [(name, shape)] float tensors (a str dim is dynamic); inits: {name: array}."""
    ins = [helper.make_tensor_value_info(n, F, list(s)) for n, s in inputs]
    outs = [helper.make_tensor_value_info(n, F, None) for n in outputs]
    init = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()]
    return helper.make_model(helper.make_graph(nodes, "t", ins, outs, init),
                             opset_imports=[helper.make_opsetid("", opset)])


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check(m, feeds, backend="reference", atol=1e-5, **load):
    """graphc's outputs equal onnxruntime's; returns the graph."""
    g = gc.onnx.load(m, **load)
    got = gc.compile(g, backend=backend).run(feeds)
    want = run_onnxruntime(m, feeds)["outputs"]
    for name, v in want.items():
        np.testing.assert_allclose(got[name], v, rtol=1e-4, atol=atol, err_msg=name)
    return g


def conv_model(**attrs):
    w = rand(4, 3, 3, 2, seed=1)
    return model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], [("x", (2, 3, 7, 6))], ["y"],
                 {"w": w, "b": rand(4, seed=2)})


@pytest.mark.parametrize("attrs", [
    {}, {"pads": [1, 0, 2, 1]}, {"strides": [2, 1], "pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, {"auto_pad": "VALID"}, {"kernel_shape": [3, 2]}])
def test_conv_attributes(attrs):
    check(conv_model(**attrs), {"x": rand(2, 3, 7, 6)})


@pytest.mark.parametrize("op, attrs", [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [2, 3], "pads": [1, 0, 0, 2], "strides": [1, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}),
    ("AveragePool", {"kernel_shape": [3, 2], "pads": [0, 1, 1, 0], "strides": [2, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
])
def test_pool_attributes(op, attrs):
    m = model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", (2, 3, 8, 7))], ["y"])
    check(m, {"x": rand(2, 3, 8, 7)})


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pools(op):
    m = model([helper.make_node(op, ["x"], ["y"])], [("x", ("n", 3, 5, 4))], ["y"])
    check(m, {"x": rand(2, 3, 5, 4)})


@pytest.mark.parametrize("attrs", [{}, {"transA": 1}, {"transB": 1, "alpha": 0.5, "beta": 2.0}, {"beta": 0.0}])
def test_gemm_attributes(attrs):
    a = rand(3, 4) if not attrs.get("transA") else rand(4, 3)
    b = rand(4, 5, seed=1) if not attrs.get("transB") else rand(5, 4, seed=1)
    m = model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], **attrs)], [("a", a.shape)], ["y"],
              {"b": b, "c": rand(5, seed=2)})
    check(m, {"a": a})


@pytest.mark.parametrize("opset, axis", [(11, 1), (11, 3), (13, 1), (13, -2)])
def test_softmax_axis_semantics(opset, axis):
    """Before opset 13 Softmax flattens the dims from `axis` on; from 13 it takes one axis."""
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], [("x", (2, 3, 4, 5))], ["y"], opset=opset)
    check(m, {"x": rand(2, 3, 4, 5)})


def test_exporter_shape_chain_folds_and_batch_stays_symbolic():
    """x.view(x.size(0), -1) as torch writes it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["nu"]),
             helper.make_node("Concat", ["nu", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1)]
    inits = {"w": rand(4, 1, 3, 3), "zero": np.array(0), "ax": np.array([0]), "minus1": np.array([-1]),
             "fc": rand(10, 4 * 6 * 6, seed=3), "fcb": rand(10, seed=4)}
    m = model(nodes, [("x", ("batch", 1, 6, 6))], ["y"], inits)
    g = gc.onnx.load(m)
    assert g["x"].shape[0] == "N" and g["flat"].shape == ("N", 144)
    assert {g.nx.nodes[n]["op"] for n in g.nx.nodes} <= {"input", "param", "conv", "relu", "reshape", "matmul", "add"}
    assert sorted(g.param_names) == ["fc", "fcb", "w"]
    exe = gc.compile(g)
    for batch in (1, 3):
        x = rand(batch, 1, 6, 6, seed=batch)
        np.testing.assert_allclose(exe.run({"x": x})["y"], run_onnxruntime(m, {"x": x})["outputs"]["y"],
                                   rtol=1e-4, atol=1e-5)


def test_convtranspose_matches_onnxruntime():
    for attrs in ({"strides": [2, 2]}, {"strides": [2, 1], "pads": [1, 0, 1, 1], "output_padding": [1, 0]},
                  {"strides": [2, 2], "output_shape": [9, 10]}, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}):
        m = model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)], [("x", (1, 3, 4, 4))], ["y"],
                  {"w": rand(3, 2, 3, 3, seed=1), "b": rand(2, seed=2)})
        check(m, {"x": rand(1, 3, 4, 4)})


def test_elementwise_and_shape_ops():
    nodes = [helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Max", ["a", "x", "z"], ["b"]),
             helper.make_node("Min", ["b", "x"], ["c"]), helper.make_node("Abs", ["c"], ["d"]),
             helper.make_node("Transpose", ["d"], ["e"], perm=[0, 2, 3, 1]),
             helper.make_node("Unsqueeze", ["e", "ax"], ["f"]), helper.make_node("Squeeze", ["f", "ax"], ["h"]),
             helper.make_node("Split", ["h"], ["p", "q"], axis=3, num_outputs=2),
             helper.make_node("Concat", ["q", "p"], ["y"], axis=3),
             helper.make_node("ReduceMean", ["y", "axes"], ["m"], keepdims=0),
             helper.make_node("Slice", ["y", "st", "en", "sax"], ["sl"])]
    inits = {"s": rand(3, 1, 1), "z": rand(4, seed=1), "ax": np.array([2]), "axes": np.array([1, 2]),
             "st": np.array([1]), "en": np.array([3]), "sax": np.array([1])}
    m = model(nodes, [("x", ("n", 3, 5, 4))], ["y", "m", "sl"], inits, opset=18)
    check(m, {"x": rand(2, 3, 5, 4)})


def test_dropout_is_identity_at_inference_and_trains_as_dropout():
    m = model([helper.make_node("Dropout", ["x"], ["y"], ratio=0.5)], [("x", ("n", 8))], ["y"], opset=11)
    g = check(m, {"x": rand(4, 8)})
    assert g.op_nodes("dropout_mask")


def test_float64_model():
    x = np.random.default_rng(0).standard_normal((2, 3))
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Tanh", ["x"], ["y"])], "t", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3])]), opset_imports=[helper.make_opsetid("", 13)])
    g = gc.onnx.load(m)
    assert g.dtype == "float64"
    np.testing.assert_allclose(gc.compile(g).run({"x": x})["y"], np.tanh(x), rtol=1e-12)


def test_old_opset_is_upgraded():
    """Opset 6 (below graphc's 7..newest) goes through onnx.version_converter."""
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", (2, 3))], ["y"], opset=6)
    check(m, {"x": rand(2, 3)})


def test_unsupported_op_names_node_and_op():
    m = model([helper.make_node("Erf", ["x"], ["y"], name="my_erf")], [("x", (2, 3))], ["y"])
    with pytest.raises(UnsupportedOnnx, match=r"'my_erf' \(Erf\).*no mapping"):
        gc.onnx.load(m)


def test_unsupported_attribute_names_it():
    m = model([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], dilations=[2, 2])],
              [("x", (1, 1, 6, 6))], ["y"])
    with pytest.raises(UnsupportedOnnx, match=r"'pool' \(MaxPool\), attribute 'dilations'"):
        gc.onnx.load(m)


def test_an_attribute_no_mapping_reads_is_an_error():
    m = model([helper.make_node("Relu", ["x"], ["y"], name="r", frobnicate=3)], [("x", (2, 3))], ["y"])
    with pytest.raises(UnsupportedOnnx, match=r"'r' \(Relu\), attribute 'frobnicate'"):
        gc.onnx.load(m)


def test_run_time_shape_input_needs_a_constant():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs")], "t",
        [helper.make_tensor_value_info("x", F, [2, 6]), helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", F, None)]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOnnx, match="must be a constant"):
        gc.onnx.load(m)
    g = gc.onnx.load(m, constants={"shape": np.array([3, 4])})
    assert g["y"].shape == (3, 4) and g.inputs == ["x"]


def test_dynamic_non_batch_dim_needs_input_shapes():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", ("n", 3, "h", "w"))], ["y"])
    with pytest.raises(UnsupportedOnnx, match="dim 2 is dynamic"):
        gc.onnx.load(m)
    g = gc.onnx.load(m, input_shapes={"x": (None, 3, 8, 8)})
    assert g["x"].shape == ("N", 3, 8, 8)


def test_reading_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        gc.onnx.load(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(OnnxError):
        gc.onnx.load(bad)
    with pytest.raises(OnnxError, match="newer than"):
        gc.onnx.load(model([helper.make_node("Relu", ["x"], ["y"])], [("x", (2,))], ["y"], opset=999))


def classifier_model():
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["prob"], axis=1)]
    inits = {"w1": rand(16, 8, seed=1) * 0.3, "b1": np.zeros(16, np.float32), "w2": rand(3, 16, seed=2) * 0.3,
             "b2": np.zeros(3, np.float32)}
    return model(nodes, [("x", ("batch", 8))], ["prob"], inits)


def test_loaded_model_trains_with_a_loss():
    g = gc.onnx.load(classifier_model(), loss="softmax_cross_entropy")
    assert g.loss == "loss" and g.outputs == ["prob", "loss"]
    assert g.nx.nodes["loss"]["inputs"][0] == "z"            # the logits: the final softmax is skipped
    assert g["labels"].dtype == "int64" and g["labels"].shape == ("N",)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    exe = gc.compile(g, optimizer=gc.optim.Adam(0.05))
    first = exe.step({"x": x, "labels": y})
    for _ in range(30):
        last = exe.step({"x": x, "labels": y})
    assert last < 0.5 * first
    assert not np.allclose(exe.params["w1"], numpy_helper.to_array(classifier_model().graph.initializer[0]))


def test_loss_needs_one_classifier_output():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", (2, 3, 4))], ["y"])
    with pytest.raises(gc.ShapeError, match="batch, classes"):
        gc.onnx.load(m, loss="softmax_cross_entropy")
    with pytest.raises(gc.GraphError, match="loss must be one of"):
        gc.onnx.load(m, loss="hinge")
    g = gc.onnx.load(m, loss="mse")
    assert g["targets"].shape == (2, 3, 4)


# --- the CNN op set of issue 12: mapped against its public names; waits where this build lacks it ---------

ISSUE_12 = {
    "LeakyRelu": ("leaky_relu", None, lambda: [helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2)], {}),
    "PRelu": ("prelu", None, lambda: [helper.make_node("PRelu", ["x", "s"], ["y"])], {"s": rand(3, 1, 1, seed=5)}),
    "Clip": ("clip", None, lambda: [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
             {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}),
    "HardSigmoid": ("clip", None, lambda: [helper.make_node("HardSigmoid", ["x"], ["y"], alpha=0.3)], {}),
    "HardSwish": ("hardswish", None, lambda: [helper.make_node("HardSwish", ["x"], ["y"])], {}),
    "BatchNormalization": ("batchnorm", None, lambda: [helper.make_node(
        "BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3)],
        {"g": rand(3, seed=1), "b": rand(3, seed=2), "m": rand(3, seed=3), "v": np.full(3, 1.5, np.float32)}),
    "LRN": ("lrn", None, lambda: [helper.make_node("LRN", ["x"], ["y"], size=3, alpha=0.1, beta=0.6, bias=1.5)], {}),
    "Conv(group)": ("conv", "groups", lambda: [helper.make_node("Conv", ["x", "w"], ["y"], group=3, pads=[1, 1, 1, 1])],
                    {"w": rand(6, 1, 3, 3, seed=1)}),
    "Conv(dilations)": ("conv", "dilation", lambda: [helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 1])],
                        {"w": rand(4, 3, 3, 3, seed=1)}),
    "Pad(reflect)": ("pad2d", "mode", lambda: [helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")],
                     {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1])}),
    "Pad(edge)": ("pad2d", "mode", lambda: [helper.make_node("Pad", ["x", "p"], ["y"], mode="edge")],
                  {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1])}),
}


@pytest.mark.parametrize("case", sorted(ISSUE_12))
def test_issue12_ops(case):
    method, param, nodes, inits = ISSUE_12[case]
    m = model(nodes(), [("x", ("n", 3, 6, 5))], ["y"], inits)
    if not graph_has(method, param):
        with pytest.raises(UnsupportedOnnx, match="issue 12") as e:
            gc.onnx.load(m)
        assert e.value.waits_for
        pytest.skip(f"waits for g.{e.value.waits_for} (issue 12)")
    check(m, {"x": rand(2, 3, 6, 5)})


def test_batched_matmul():
    from graphc.onnx.registry import batched_matmul
    m = model([helper.make_node("MatMul", ["a", "b"], ["y"])], [("a", (2, 3, 4))], ["y"], {"b": rand(2, 4, 5, seed=1)})
    if not batched_matmul():
        with pytest.raises(UnsupportedOnnx, match="issue 12"):
            gc.onnx.load(m)
        pytest.skip("waits for batched g.matmul (issue 12)")
    check(m, {"a": rand(2, 3, 4)})


def test_torch_export_round_trip(tmp_path):
    """A PyTorch CNN through torch.onnx.export (dynamic batch, x.view(x.size(0), -1), ceil-mode and
    padding-excluding pools, a transposed conv) gives torch's outputs in graphc at any batch size."""
    torch = pytest.importorskip("torch")
    import warnings

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1 = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.up = torch.nn.ConvTranspose2d(6, 4, 2, stride=2)
            self.p1 = torch.nn.MaxPool2d(3, 2, ceil_mode=True)
            self.p2 = torch.nn.AvgPool2d(3, 2, padding=1, count_include_pad=False)
            self.fc = torch.nn.Linear(4 * 5 * 5, 7)
            self.drop = torch.nn.Dropout(0.3)

        def forward(self, x):
            h = self.p2(self.p1(self.up(torch.relu(self.c1(x)))))
            return torch.softmax(self.fc(self.drop(h.view(h.size(0), -1))), dim=1)

    net = Net().eval()
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 9, 9),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}})
    g = gc.onnx.load(path)
    exe = gc.compile(g)
    for batch in (1, 4):
        x = rand(batch, 3, 9, 9, seed=batch)
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(exe.run({"x": x})["y"], want, rtol=1e-4, atol=1e-6)
