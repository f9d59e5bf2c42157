"""gc.onnx.save: zoo models and trained executables exported, checked by onnx.checker (full_check) and
run by onnxruntime with graphc's outputs; round trips through gc.onnx.load; the onnxruntime peer; the
command line's .onnx models and `graphc convert`."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import graphc as gc  # noqa: E402
from graphc.onnx.exporter import to_model  # noqa: E402
from graphc.onnx.peer import run_onnxruntime  # noqa: E402
from graphc.onnx.registry import graph_has  # noqa: E402

ZOO = ["mlp", "lenet5", "mnist_convnet", "codelab_cnn", "resnet_block", "resnet", "inception_block", "inception"]


def feeds_for(g, batch=2, seed=0):
    from graphc.rendering import example_feeds
    return example_feeds(g, batch=batch, seed=seed)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_runs_in_onnxruntime(name, tmp_path):
    g = gc.models.load(name)
    path = tmp_path / f"{name}.onnx"
    m = gc.onnx.save(g, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    feeds = feeds_for(g, batch=3)
    want = gc.compile(g, keep=["logits"]).run(feeds, outputs=["logits"])
    r = run_onnxruntime(path, feeds, expect=want)
    assert r["agree"], r["max_abs_err"]


def test_trained_lenet5_exports_its_logits(tmp_path):
    """A lenet5 trained by graphc (numba, fused kernels, SGD with momentum; the configuration of
    test_numba_backend's executable test, so their kernels are shared) runs in onnxruntime with the same
    logits."""
    g = gc.models.lenet5()
    exe = gc.compile(g, backend="numba", optimizer=gc.optim.SGD(0.05, momentum=0.9), keep=["logits"])
    rng = np.random.default_rng(0)
    for _ in range(3):
        exe.step({"x": rng.standard_normal((2, 1, 28, 28)).astype(np.float32), "labels": rng.integers(0, 10, 2)})
    assert not np.allclose(exe.params["c1.w"], g.params["c1.w"])
    path = tmp_path / "lenet5.onnx"
    m = gc.onnx.save(exe, path)
    assert {t.name for t in m.graph.initializer} >= set(g.param_names)
    assert not any(t.name.startswith("optim/") for t in m.graph.initializer)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    logits = exe.run({"x": x, "labels": np.zeros(3, np.int64)}, outputs=["logits"])["logits"]
    ort = run_onnxruntime(path, {"x": x})["outputs"]["logits"]
    assert np.max(np.abs(ort - logits)) <= 1e-5


def test_round_trip_keeps_names_weights_and_outputs():
    g = gc.models.resnet_block()
    h = gc.onnx.load(to_model(g))
    assert sorted(h.param_names) == sorted(g.param_names)
    for n in g.param_names:
        np.testing.assert_array_equal(h.params[n], g.params[n])
    feeds = feeds_for(g)
    want = gc.compile(g, keep=["logits"]).run(feeds, outputs=["logits"])["logits"]
    np.testing.assert_allclose(gc.compile(h).run({"x": feeds["x"]})["logits"], want, rtol=1e-5, atol=1e-6)


def test_dropout_exports_as_identity_and_loss_drops_out():
    m = to_model(gc.models.mnist_convnet())
    ops = [n.op_type for n in m.graph.node]
    assert "Identity" in ops and not {"Dropout", "RandomUniformLike"} & set(ops)
    assert [i.name for i in m.graph.input] == ["x"]


@pytest.mark.parametrize("opset", [11, 13, 17, None])
def test_opsets(opset):
    m = to_model(gc.models.lenet5(), opset=opset)
    want = 17 if opset is None else opset
    assert m.opset_import[0].version == want
    g = gc.models.lenet5()
    feeds = feeds_for(g)
    r = run_onnxruntime(m, feeds, expect=gc.compile(g, keep=["logits"]).run(feeds, outputs=["logits"]))
    assert r["agree"]


def test_export_errors(tmp_path):
    with pytest.raises(gc.GraphError, match="takes a graphc Graph"):
        gc.onnx.save("lenet5", tmp_path / "x.onnx")
    with pytest.raises(gc.GraphError, match="opset must be"):
        to_model(gc.models.mlp(), opset=3)
    bwd = gc.grad(gc.models.lenet5())
    with pytest.raises(gc.GraphError, match="has no ONNX export"):
        to_model(bwd, outputs=["grad/c1.w"])
    with pytest.raises(gc.GraphError, match="no value"):
        to_model(gc.models.mlp(), outputs=["nope"])
    assert not list(tmp_path.iterdir())          # nothing half-written


def test_onnxruntime_peer_times_and_checks():
    g = gc.models.lenet5()
    feeds = feeds_for(g, batch=8)
    want = gc.compile(g, keep=["logits"]).run(feeds, outputs=["logits"])
    r = run_onnxruntime(g, feeds, threads=1, repeats=3, expect=want)
    assert r["agree"] and r["threads"] == 1 and r["step_ms"] > 0 and r["max_abs_err"] < 1e-4
    wrong = {"logits": want["logits"] + 1.0}
    assert run_onnxruntime(g, feeds, expect=wrong)["agree"] is False


def test_issue12_ops_export():
    """BN (running stats), LRN, LeakyRelu, PRelu, clip, silu, hardswish, grouped/dilated conv: exported
    and run by onnxruntime with graphc's values (runs once the issue-12 ops exist)."""
    needed = ["batchnorm", "lrn", "leaky_relu", "prelu", "clip", "silu", "hardswish"]
    missing = [m for m in needed if not graph_has(m)] + ([] if graph_has("conv", "groups") else ["conv(groups)"])
    if missing:
        pytest.skip(f"waits for {', '.join(missing)} (issue 12)")
    g = gc.Graph("ops12")
    x = g.input("x", (None, 4, 8, 8))
    h = g.conv(x, g.param("w", (8, 2, 3, 3)), g.param("b", (8,), init="zeros"), pad=2, dilation=2, groups=2)
    h = g.batchnorm(h, g.param("gamma", (8,), init="ones"), g.param("beta", (8,), init="zeros"),
                    g.param("rm", value=np.linspace(-1, 1, 8), trainable=False),
                    g.param("rv", value=np.linspace(0.5, 2, 8), trainable=False), eps=1e-3)
    h = g.lrn(g.leaky_relu(h, 0.1), 3, alpha=0.2, beta=0.7, k=1.5)
    h = g.hardswish(g.silu(g.clip(g.prelu(h, g.param("s", value=np.linspace(0.1, 0.3, 8))), -2.0, 3.0)))
    g.output(g.global_maxpool(h, name="y"))
    feeds = feeds_for(g)
    r = run_onnxruntime(g, feeds, expect=gc.compile(g).run(feeds))
    assert r["agree"], r["max_abs_err"]


# --- the command line -----------------------------------------------------------------------------------

def test_cli_convert_round_trip_summary_render(tmp_path, capsys):
    from graphc.cli import main
    a, b = tmp_path / "lenet5.onnx", tmp_path / "again.onnx"
    assert main(["convert", "lenet5", "-o", str(a), "--check"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "agrees" in out
    assert main(["convert", str(a), "-o", str(b), "--check"]) == 0
    assert "agrees" in capsys.readouterr().out
    assert main(["summary", str(b)]) == 0
    out = capsys.readouterr().out
    assert "61,706" in out and "softmax_cross_entropy" in out
    pytest.importorskip("pygraphviz")
    assert main(["render", str(a), "--backward", "-o", str(tmp_path / "l.svg")]) == 0
    assert (tmp_path / "l.svg").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    from graphc.cli import main
    assert main(["convert", "lenet5", "-o", str(tmp_path / "x.txt")]) == 1
    assert main(["summary", str(tmp_path / "missing.onnx")]) == 1
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    assert main(["summary", str(tmp_path / "bad.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("graphc: error:") for line in err)


def test_cli_train_export_runs_in_onnxruntime_with_the_trained_logits(tmp_path, capsys):
    """`graphc train lenet5 --export model.onnx`: the exported file holds the trained weights, so
    onnxruntime gives the logits of the trained model (gc.load of the same run's checkpoint), to 1e-5."""
    ort = pytest.importorskip("onnxruntime")
    from graphc.cli import main
    ckpt, model = tmp_path / "run.npz", tmp_path / "lenet5.onnx"
    assert main(["train", "lenet5", "--epochs", "1", "--batch", "128", "--no-progress", "--save", str(ckpt),
                 "--export", str(model)]) == 0
    assert f"exported {model}" in capsys.readouterr().out
    x = np.random.default_rng(0).random((8, 1, 28, 28)).astype(np.float32)
    want = gc.load(ckpt).run({"x": x}, outputs=["logits"])["logits"]
    got = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    untrained = gc.compile(gc.models.load("lenet5")).run({"x": x}, outputs=["logits"])["logits"]
    assert np.abs(got - untrained).max() > 1e-2                  # the weights are the trained ones ...
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # ... and onnxruntime agrees with graphc
