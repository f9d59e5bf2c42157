"""From a trained model to a prediction: gc.load / gc.save, training checkpoints into inference graphs
(optimizer state left out, batch-norm statistics kept), runs without labels on every backend (the
label-range check kept for labels that are fed), gc.infer.predict on one image or a batch, and the
`graphc predict` verb."""
import re
import textwrap

import numpy as np
import pytest

import graphc as gc
from graphc import cli, data
from graphc.checkpoint import load_checkpoint, read_checkpoint
from graphc.errors import CheckpointError, FeedError, GraphError


@pytest.fixture(scope="module")
def tiny():
    full = data.load_mnist5k()
    return data.Dataset(full.x_train[:256], full.y_train[:256], full.x_test[:64], full.y_test[:64], "mnist5k-tiny",
                        data.DIGITS)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    ck = tmp_path_factory.mktemp("art") / "resnet.npz"
    r = gc.train.train("resnet", data=tiny, epochs=1, batch=64, backend="reference", save=ck, progress=False, log=None)
    return r, ck


# ------------------------------------------------------------------------------------------ feeds

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_run_without_labels_when_the_outputs_do_not_need_them(backend):
    g = gc.models.load("lenet5")
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    exe = gc.compile(g, backend=backend, keep=["logits"])
    logits = exe.run({"x": x}, outputs=["logits"])["logits"]
    full = exe.run({"x": x, "labels": np.array([1, 2, 3])}, outputs=["logits", "loss"])
    np.testing.assert_allclose(logits, full["logits"], rtol=1e-6)
    with pytest.raises(FeedError, match="'labels'"):             # the loss does need them
        exe.run({"x": x})
    with pytest.raises(FeedError, match=r"label 10 at position 1 is outside 0\.\.9"):   # fed labels still checked
        exe.run({"x": x, "labels": np.array([1, 10, 3])}, outputs=["logits"])


# ------------------------------------------------------------------------------------------ load and save

def test_training_checkpoint_loads_into_an_inference_graph(trained, tiny):
    r, ck = trained
    arrays, meta = read_checkpoint(ck)
    assert any(k.startswith("optim/") for k in arrays) and any("running_mean" in k for k in arrays)
    exe = gc.load(ck)
    assert exe.outputs == ["logits", "probs"] and not any(k.startswith("optim/") for k in exe.state)
    for name in exe.state:                    # parameters and batch-norm running statistics, as trained
        np.testing.assert_array_equal(exe.state[name], r.exe.state[name])
    x = gc.data.normalize(tiny.x_test)
    out = exe.run({"x": x})
    want = r.infer_exe.run({"x": x, "labels": tiny.y_test}, outputs=["logits"])["logits"]
    np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1, rtol=1e-5)
    assert exe.artifact.model == "resnet" and exe.artifact.classes == data.DIGITS
    assert exe.artifact.preprocess.mode == "scale"
    # the old error path: load_checkpoint into a forward executable leaves the optimizer state out
    fwd = gc.compile(gc.models.load("resnet", loss=False))
    load_checkpoint(ck, fwd)
    np.testing.assert_array_equal(fwd.state["stem.weight"], r.exe.state["stem.weight"])


def test_save_writes_parameters_only_and_round_trips(trained, tiny, tmp_path):
    r, ck = trained
    small = gc.save(tmp_path / "model.npz", r)
    arrays, meta = read_checkpoint(small)
    assert not any(k.startswith("optim/") for k in arrays) and meta["kind"] == "model"
    assert small.stat().st_size < ck.stat().st_size
    a, b = gc.load(small), gc.load(ck)
    x = tiny.x_test[:10]
    np.testing.assert_array_equal(gc.infer.predict(a, x)[1], gc.infer.predict(b, x)[1])
    again = gc.save(tmp_path / "again.npz", a)                   # from a loaded model too
    assert read_checkpoint(again)[1]["recipe"] == meta["recipe"]


def test_predict_takes_one_image_or_a_batch(trained, tiny):
    r, ck = trained
    exe = gc.load(ck)
    classes, probs = gc.infer.predict(exe, tiny.x_test)
    one, p1 = gc.infer.predict(exe, tiny.x_test[3])             # (28, 28) uint8
    assert one.shape == (1,) and one[0] == classes[3] and np.allclose(p1[0], probs[3], atol=1e-6)
    assert gc.infer.predict(exe, tiny.x_test[3][None])[0][0] == classes[3]          # (1, 28, 28)
    assert gc.infer.predict(exe, tiny.x_test[3][:, :, None])[0][0] == classes[3]    # (28, 28, 1)
    assert gc.infer.predict(r, tiny.x_test[3])[0][0] == classes[3]                  # a TrainResult
    top, p = gc.infer.topk(probs, 3)
    assert top.shape == (64, 3) and np.array_equal(top[:, 0], classes) and (np.diff(p, axis=1) <= 0).all()
    with pytest.raises(GraphError, match="trained on"):
        gc.infer.predict(exe, np.zeros((2, 3, 28, 28), np.uint8))


def test_models_from_files_and_graphs(tmp_path, tiny):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent("""
        import graphc as gc
        def build(seed=0, num_classes=10):
            return gc.models.load("mlp", seed=seed, num_classes=num_classes)
    """))
    ck = tmp_path / "file.npz"
    gc.train.train(f"{src}:build", data=tiny, epochs=1, backend="reference", save=ck, progress=False, log=None)
    rec = read_checkpoint(ck)[1]["recipe"]
    assert rec == {"model": f"{src.resolve()}:build", "kwargs": {"seed": 0, "num_classes": 10}}
    assert gc.load(ck).artifact.model == rec["model"]
    # a graph built in Python has no recipe: gc.load says to pass it
    g = gc.models.load("mlp", seed=3)
    g.name = "my_mlp"
    ck2 = tmp_path / "graph.npz"
    gc.train.train(g, data=tiny, epochs=1, backend="reference", save=ck2, progress=False, log=None)
    with pytest.raises(CheckpointError, match="model=graph"):
        gc.load(ck2)
    assert gc.load(ck2, model=g).outputs == ["logits", "probs"]
    with pytest.raises(CheckpointError, match="another graph"):
        gc.load(ck2, model=gc.models.load("lenet5"))


def test_export_hook_says_what_it_needs(trained, tmp_path):
    from graphc import artifact
    try:
        import graphc.onnx as gonnx
        have = hasattr(gonnx, "save")
    except ImportError:
        have = False
    if have:
        pytest.skip("gc.onnx.save is in this build: the ONNX tests cover export")
    with pytest.raises(GraphError, match="gc.onnx.save"):
        artifact.export_onnx(trained[0], tmp_path / "m.onnx")
    with pytest.raises(GraphError, match="--export needs gc.onnx.save"):
        gc.train.train("mlp", epochs=1, export=tmp_path / "m.onnx", log=None)


# ------------------------------------------------------------------------------------------ graphc predict

def test_predict_cli_images_folders_npy_and_errors(trained, tiny, tmp_path, capsys):
    pytest.importorskip("PIL")
    from PIL import Image
    r, ck = trained
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(tiny.x_test[i]).save(folder / f"d{i}.png")
    Image.fromarray(tiny.x_test[3]).convert("RGB").resize((56, 56)).save(tmp_path / "big_rgb.png")   # converted
    np.save(tmp_path / "batch.npy", tiny.x_test[4:6])
    np.save(tmp_path / "one.npy", tiny.x_test[6])
    want, probs = gc.infer.predict(r, tiny.x_test[:7])
    capsys.readouterr()
    rc = cli.main(["predict", str(ck), str(folder), str(tmp_path / "batch.npy"), str(tmp_path / "one.npy"),
                   "--top-k", "2"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    got = [int(re.match(r".*: (\d) \(", s).group(1)) for s in lines]
    assert got == [want[0], want[1], want[2], want[4], want[5], want[6]]
    assert lines[3].startswith(f"{tmp_path / 'batch.npy'}[0]: ") and lines[0].count("%") == 2
    assert f"({100 * probs[0].max():.2f}%)" in lines[0]
    assert cli.main(["predict", str(ck), str(tmp_path / "big_rgb.png")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'big_rgb.png'}: ")
    # a zoo model: initial weights, with a note
    assert cli.main(["predict", "lenet5", str(folder / "d0.png")]) == 0
    assert "untrained" in capsys.readouterr().out
    for argv, msg in ((["predict", str(ck), str(tmp_path / "nope.png")], "no such file"),
                      (["predict", str(tmp_path / "missing.npz"), str(folder)], "not found"),
                      (["predict", str(ck), str(folder), "--top-k", "0"], "top-k")):
        assert cli.main(argv) == 1
        assert msg in capsys.readouterr().err


def test_python_m_graphc(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "graphc", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "predict" in p.stdout and "graphc predict run.npz digit.png" in p.stdout
