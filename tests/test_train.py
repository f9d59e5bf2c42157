"""Tests for graphc.train and graphc.checkpoint: training on tiny subsets with the reference backend,
reproducibility, exact resume (at an epoch boundary and mid-epoch), checkpoint errors and atomic writes."""

import argparse
import os
import re
import signal
import zipfile

import numpy as np
import pytest

import graphc as gc
from graphc import checkpoint, data, nn
from graphc.checkpoint import graph_fingerprint, load_checkpoint, read_checkpoint, save_checkpoint, write_arrays
from graphc.errors import CheckpointError, GraphError
from graphc.train import add_train_arguments, main_from_args, train


@pytest.fixture(scope="module")
def full():
    return data.load_mnist5k()


@pytest.fixture(scope="module")
def tiny(full):
    """256 training and 128 test digits of the embedded subset."""
    return data.Dataset(full.x_train[:256], full.y_train[:256], full.x_test[:128], full.y_test[:128], "mnist5k-tiny")


def toy(seed=0, width=4, dropout=0.5):
    """A 2-conv toy CNN with dropout (so resume must also restore the dropout stream)."""
    g = gc.Graph("toy", seed=seed)
    x = g.input("x", (None, 1, 28, 28))
    h = g.maxpool(nn.conv2d(g, x, width, 3, stride=2, name="conv1"), 2, name="pool1")   # 4x6x6... 13->6
    h = nn.conv2d(g, h, 8, 3, name="conv2")
    h = g.flatten(h, name="flatten")
    if dropout:
        h = g.dropout(h, dropout, name="dropout")
    logits = nn.dense(g, h, 10, name="logits", init="glorot")
    y = g.input("labels", (None,), dtype="int64")
    g.output(g.softmax_cross_entropy(logits, y, name="loss"))
    return g


def run(model, ds, **kw):
    lines = []
    kw.setdefault("backend", "reference")
    kw.setdefault("batch", 32)
    kw.setdefault("progress", False)
    r = train(model, data=ds, log=lines.append, **kw)
    return r, lines


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- training


def test_loss_decreases_and_lines_printed(tiny):
    r, lines = run("mlp", tiny, epochs=3, batch=32, optimizer="adam", lr=3e-3)
    assert r.epochs == 3 and len(r.step_losses) == 3 * 8
    assert r.train_loss[-1] < r.train_loss[0]
    assert r.final_test_accuracy > 0.3               # chance is 0.1
    assert r.backend == "reference"
    epoch_lines = [s for s in lines if s.startswith("epoch ")]
    assert len(epoch_lines) == 3
    assert re.search(r"train loss \d+\.\d{4}.*test accuracy 0\.\d{4}, [\d,]+ images/s", epoch_lines[0])
    assert re.fullmatch(r"test accuracy: [01]\.\d{4}", lines[-1])
    assert lines[-1] == f"test accuracy: {r.final_test_accuracy:.4f}"
    assert all(v > 0 for v in r.images_per_second)


def test_sgd_and_momentum_train(tiny):
    for opt in ("sgd", "momentum"):
        r, _ = run("mlp", tiny, epochs=2, optimizer=opt)
        assert r.config["optimizer"]["name"] == opt
        assert np.isfinite(r.train_loss).all() and r.train_loss[-1] < r.train_loss[0]
    assert r.config["optimizer"]["momentum"] == 0.9 and r.config["optimizer"]["lr"] == 0.01


def test_reproducible_with_seed(tiny):
    a, _ = run(toy(seed=3), tiny, epochs=1, seed=3)
    b, _ = run(toy(seed=3), tiny, epochs=1, seed=3)
    c, _ = run(toy(seed=4), tiny, epochs=1, seed=4)
    assert a.step_losses == b.step_losses
    same_state(a.exe, b.exe)
    assert a.step_losses != c.step_losses
    # zoo names get their initial weights from the seed
    d, _ = run("mlp", tiny, epochs=1, seed=1)
    e, _ = run("mlp", tiny, epochs=1, seed=2)
    assert not np.array_equal(d.exe.params["fc1.w"], e.exe.params["fc1.w"])


@pytest.mark.parametrize("model,optimizer", [("toy", "adam"), ("mlp", "momentum")])
def test_resume_equals_uninterrupted(tiny, tmp_path, model, optimizer):
    build = (lambda: toy()) if model == "toy" else (lambda: "mlp")
    straight, _ = run(build(), tiny, epochs=2, optimizer=optimizer)
    ck = tmp_path / "ck.npz"
    first, _ = run(build(), tiny, epochs=1, optimizer=optimizer, save=ck)
    assert ck.is_file()
    resumed, lines = run(build(), tiny, epochs=2, resume=ck, save=ck)   # optimizer/seed/batch from ck
    assert any(s.startswith("resuming from") for s in lines)
    same_state(straight.exe, resumed.exe)
    assert resumed.step_losses == straight.step_losses
    assert resumed.train_loss == straight.train_loss
    assert resumed.test_accuracy == straight.test_accuracy
    assert resumed.exe.step_count == straight.exe.step_count == 16
    _, meta = read_checkpoint(ck)
    assert meta["epoch"] == 2 and meta["step"] == 16 and meta["optimizer"]["name"] == optimizer


def test_resume_with_nothing_left_to_train(tiny, tmp_path):
    ck = tmp_path / "ck.npz"
    r1, _ = run("mlp", tiny, epochs=1, save=ck)
    r2, lines = run("mlp", tiny, epochs=1, resume=ck)
    assert any("nothing to train" in s for s in lines)
    assert r2.final_test_accuracy == r1.final_test_accuracy
    same_state(r1.exe, r2.exe)


def test_interrupt_mid_epoch_saves_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    straight, _ = run(toy(), tiny, epochs=2)
    real_batches = data.batches

    def interrupting(*a, **k):            # Ctrl-C after the 3rd batch of the second epoch
        it = real_batches(*a, **k)
        for i, b in enumerate(it):
            if k.get("epoch") == 1 and i == 3:
                os.kill(os.getpid(), signal.SIGINT)
            yield b

    ck = tmp_path / "ck.npz"
    monkeypatch.setattr(data, "batches", interrupting)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        train(toy(), data=tiny, epochs=2, batch=32, backend="reference", save=ck, progress=False, log=lines.append)
    monkeypatch.setattr(data, "batches", real_batches)
    _, meta = read_checkpoint(ck)
    assert meta["epoch"] == 1 and meta["batch_in_epoch"] in (3, 4)
    assert any("interrupted in epoch 2" in s for s in lines)
    resumed, _ = run(toy(), tiny, epochs=2, resume=ck)
    same_state(straight.exe, resumed.exe)
    assert resumed.step_losses == straight.step_losses
    assert resumed.train_loss == straight.train_loss
    assert resumed.test_accuracy == straight.test_accuracy


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_metadata(tiny, tmp_path):
    r, _ = run("mlp", tiny, epochs=1, seed=5, save=tmp_path / "m.npz")
    arrays, meta = read_checkpoint(tmp_path / "m.npz")
    assert meta["model"] == "mlp" and meta["seed"] == 5 and meta["epoch"] == 1 and meta["data"] == "mnist5k-tiny"
    assert meta["optimizer"] == {"name": "adam", "lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-08,
                                 "bias_correction": True}
    assert meta["fingerprint"] == graph_fingerprint(gc.models.load("mlp"))
    assert set(arrays) == set(r.exe.state) | {"__step__"}
    assert any(k.startswith("optim/m/") for k in arrays)
    exe = gc.compile(gc.models.load("mlp", seed=9), optimizer=gc.optim.Adam(1e-3))
    load_checkpoint(tmp_path / "m.npz", exe, fingerprint=meta["fingerprint"], model="mlp")
    same_state(exe, r.exe)


def test_checkpoint_errors(tiny, tmp_path):
    ck = tmp_path / "toy.npz"
    run(toy(), tiny, epochs=1, save=ck)
    # wrong model
    with pytest.raises(CheckpointError, match="model 'toy', not 'mlp'"):
        run("mlp", tiny, epochs=2, resume=ck)
    # same name, other layer sizes: the fingerprint catches it in train(); shapes in load_checkpoint
    with pytest.raises(CheckpointError, match="different graph structure"):
        run(toy(width=6), tiny, epochs=2, resume=ck)
    exe6 = gc.compile(toy(width=6), optimizer=gc.optim.Adam(1e-3))
    with pytest.raises(CheckpointError, match=r"wrong shape.*conv1\.w: checkpoint \(4, 1, 3, 3\), graph \(6, 1, 3, 3\)"):
        load_checkpoint(ck, exe6)
    # another optimizer's state
    with pytest.raises(CheckpointError, match="optimizer state differs"):
        run(toy(), tiny, epochs=2, resume=ck, optimizer="momentum")
    # missing keys
    arrays, meta = read_checkpoint(ck)
    del arrays["conv2.w"]
    del meta["state_names"]
    write_arrays(tmp_path / "missing.npz", arrays, meta)
    exe = gc.compile(toy(), optimizer=gc.optim.Adam(1e-3))
    with pytest.raises(CheckpointError, match="conv2.w"):
        load_checkpoint(tmp_path / "missing.npz", exe)
    # corrupt / truncated / not a checkpoint / absent
    raw = ck.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file at all" * 10)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    for name, msg in (("trunc.npz", "corrupt or truncated"), ("junk.npz", "corrupt or truncated"),
                      ("plain.npz", "not a graphc checkpoint"), ("absent.npz", "not found")):
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(tmp_path / name, exe)
    with pytest.raises(CheckpointError):
        run(toy(), tiny, epochs=2, resume=tmp_path / "trunc.npz")
    assert issubclass(CheckpointError, GraphError)


class Boom(OSError):
    pass


@pytest.mark.parametrize("failure, raised", [(Boom, gc.OutputError), (KeyboardInterrupt, KeyboardInterrupt)])
def test_atomic_write_never_leaves_a_partial_file(tiny, tmp_path, monkeypatch, failure, raised):
    """A write that fails midway (an OSError: disk full, I/O error -> one-line OutputError; or Ctrl-C)."""
    ck = tmp_path / "ck.npz"
    r, _ = run("mlp", tiny, epochs=1, save=ck)
    before = ck.read_bytes()
    real = checkpoint._write_npz

    def failing(f, arrays):          # writes half the archive, then fails (disk full, Ctrl-C, ...)
        import io
        buf = io.BytesIO()
        real(buf, arrays)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise failure("simulated failure mid-write")

    monkeypatch.setattr(checkpoint, "_write_npz", failing)
    r.exe.step({"x": data.normalize(tiny.x_train[:8]), "labels": tiny.y_train[:8]})
    with pytest.raises(raised):
        save_checkpoint(ck, r.exe, {"model": "mlp"})
    assert ck.read_bytes() == before                       # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]   # no temp file left
    with pytest.raises(raised):
        save_checkpoint(tmp_path / "new.npz", r.exe, {})
    assert not (tmp_path / "new.npz").exists()              # nothing half-written under the real name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]
    monkeypatch.setattr(checkpoint, "_write_npz", real)
    save_checkpoint(ck, r.exe, {"model": "mlp"})
    assert zipfile.is_zipfile(ck) and read_checkpoint(ck)[1]["step"] == 9


# --------------------------------------------------------------------------- data, CLI glue, errors


def test_idx_data_path(full, tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    data.write_idx(d / "train-images-idx3-ubyte.gz", full.x_train[:128])
    data.write_idx(d / "train-labels-idx1-ubyte.gz", full.y_train[:128])
    data.write_idx(d / "t10k-images-idx3-ubyte", full.x_test[:64])
    data.write_idx(d / "t10k-labels-idx1-ubyte", full.y_test[:64])
    r, lines = run("mlp", f"mnist:{d}", epochs=1, save=tmp_path / "ck.npz")
    assert r.config["data"] == f"mnist:{d}" and len(r.step_losses) == 4
    assert lines[-1].startswith("test accuracy: ")
    assert read_checkpoint(tmp_path / "ck.npz")[1]["data"] == f"mnist:{d}"
    (d / "t10k-labels-idx1-ubyte").write_bytes((d / "t10k-labels-idx1-ubyte").read_bytes()[:-5])
    with pytest.raises(gc.DataError, match="truncated"):
        run("mlp", f"mnist:{d}", epochs=1)


def test_cli_arguments_and_main_from_args(tiny, tmp_path, capsys, monkeypatch):
    p = add_train_arguments(argparse.ArgumentParser())
    args = p.parse_args(["mlp", "--epochs", "1", "--batch", "32", "--optimizer", "sgd", "--lr", "0.05",
                         "--backend", "reference", "--seed", "2", "--save", str(tmp_path / "c.npz"), "--no-progress"])
    assert (args.model, args.data, args.epochs, args.batch, args.optimizer, args.lr, args.backend, args.seed,
            args.resume, args.progress) == ("mlp", None, 1, 32, "sgd", 0.05, "reference", 2, None, False)
    defaults = p.parse_args(["lenet5"])
    assert (defaults.epochs, defaults.backend, defaults.progress) == (1, "numba", True)
    monkeypatch.setattr(data, "load_dataset", lambda spec: tiny)
    assert main_from_args(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"test accuracy: 0\.\d{4}", out[-1])
    assert read_checkpoint(tmp_path / "c.npz")[1]["optimizer"]["lr"] == 0.05
    # a Namespace from another parser, with only the documented attributes
    ns = argparse.Namespace(model="mlp", data="mnist5k", epochs=1, batch=64, optimizer="adam", lr=None,
                            backend="reference", seed=0, save=None, resume=None)
    assert main_from_args(ns) == 0


def test_numba_unavailable_falls_back_with_a_note(tiny, monkeypatch):
    real = gc.compile

    def no_numba(graph, backend="reference", **kw):
        if backend == "numba":
            raise gc.BackendError("numba backend not built here")
        return real(graph, backend=backend, **kw)

    monkeypatch.setattr(gc, "compile", no_numba)
    r, lines = run("mlp", tiny, epochs=1, backend="numba")
    assert r.backend == "reference"
    assert any(s.startswith("note: the numba backend is not available") for s in lines)


def test_bad_models_and_arguments(tiny):
    g = gc.Graph("nolabels")
    x = g.input("x", (None, 1, 28, 28))
    g.output(g.mean(nn.dense(g, g.flatten(x), 10, name="logits")))
    with pytest.raises(GraphError, match='input "labels"'):
        run(g, tiny, epochs=1)
    with pytest.raises(GraphError, match="unknown model"):
        run("no_such_model", tiny)
    with pytest.raises(GraphError, match="unknown optimizer"):
        run("mlp", tiny, optimizer="rmsprop")
    with pytest.raises(GraphError, match="takes images shaped"):
        run("resnet_block", tiny)
    with pytest.raises(gc.DataError):
        run("mlp", "cifar10")


def test_seed_example_matches_the_course(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "seed_example.py"
    spec = importlib.util.spec_from_file_location("seed_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main() == 0
    out = capsys.readouterr().out
    assert "every value matches the course" in out and " NO" not in out
