"""Training conveniences: the callback hook, early stopping on the validation loss, the CSV log,
TensorBoard scalars (tensorboardX, optional), the --plots pictures (matplotlib, optional), progress bars
and the compile phase before epoch 1."""
import csv
import io
import struct

import numpy as np
import pytest

import graphc as gc
from graphc import callbacks as cbs
from graphc import cli, data
from graphc.errors import GraphError
from graphc.train import train


@pytest.fixture(scope="module")
def tiny():
    full = data.load_mnist5k()
    return data.Dataset(full.x_train[:160], full.y_train[:160], full.x_test[:64], full.y_test[:64], "mnist5k-tiny",
                        data.DIGITS)


def run(ds, **kw):
    lines = []
    kw = {"backend": "reference", "batch": 32, "progress": False, **kw}
    return train(kw.pop("model", "mlp"), data=ds, log=lines.append, **kw), lines


class Recorder(cbs.Callback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_train_begin(self, run):
        self.events.append(("begin", run.has_validation))

    def on_epoch_end(self, run, logs):
        self.events.append(("epoch", dict(logs)))
        return logs["epoch"] == self.stop_at

    def on_train_end(self, run):
        self.events.append(("end", len(run.result.train_loss)))


def test_callback_hook_sees_every_epoch_and_can_stop(tiny):
    rec = Recorder(stop_at=2)
    r, lines = run(tiny, epochs=4, validation=0.2, callbacks=[rec])
    assert [e[0] for e in rec.events] == ["begin", "epoch", "epoch", "end"]
    assert rec.events[0] == ("begin", True) and rec.events[-1] == ("end", 2)
    logs = rec.events[1][1]
    assert set(logs) == set(cbs.LOG_FIELDS) and logs["epoch"] == 1
    assert logs["train_loss"] == r.train_loss[0] and logs["val_loss"] == r.val_loss[0]
    assert logs["lr"] == pytest.approx(1e-3) and logs["test_accuracy"] == r.test_accuracy[0]
    assert r.epochs == 2 and r.stopped_early and lines[-1].startswith("test accuracy: ")


class FakeLoss(cbs.Callback):
    """Overwrites the validation loss the callbacks after it see: 3.0, 2.0, 2.5, 2.4, 2.6, ..."""
    values = [3.0, 2.0, 2.5, 2.4, 2.6, 2.7, 2.8]

    def on_epoch_end(self, run, logs):
        logs["val_loss"] = self.values[logs["epoch"] - 1]


def test_early_stopping_on_validation_loss(tiny):
    stop = cbs.EarlyStopping(patience=2)
    r, lines = run(tiny, epochs=7, validation=0.2, callbacks=[FakeLoss(), stop])
    assert r.epochs == 4 and stop.best == 2.0 and stop.best_epoch == 2 and stop.stopped_epoch == 4
    assert any("early stopping: val_loss has not improved for 2 epoch(s) (best 2.0000 at epoch 2)" in s for s in lines)
    # min_delta: 2.4 is not better than 2.0 by more than ... a big delta
    stop = cbs.EarlyStopping(patience=1, min_delta=0.5)
    r, _ = run(tiny, epochs=7, validation=0.2, callbacks=[FakeLoss(), stop])
    assert r.epochs == 3 and stop.best == 2.0                  # 3.0 -> 2.0 improves by 1.0, then 2.5 does not


class Snapshots(cbs.Callback):
    def __init__(self):
        self.states = {}

    def on_epoch_end(self, run, logs):
        self.states[logs["epoch"]] = {n: np.array(v) for n, v in run.result.exe.state.items()}


def test_early_stopping_restores_the_best_parameters(tiny):
    snaps, stop = Snapshots(), cbs.EarlyStopping(patience=2, restore_best=True)
    r, lines = run(tiny, epochs=7, validation=0.2, callbacks=[FakeLoss(), snaps, stop])
    assert r.epochs == 4 and any(s.startswith("restored the parameters of epoch 2") for s in lines)
    for n, v in snaps.states[2].items():
        np.testing.assert_array_equal(r.exe.state[n], v)
    acc, _ = gc.train.evaluate(r.infer_exe, gc.data.normalize(tiny.x_test), tiny.y_test)
    assert r.final_test_accuracy == acc


def test_early_stopping_without_validation_watches_the_test_loss(tiny):
    stop = cbs.EarlyStopping(patience=3)
    r, lines = run(tiny, epochs=1, callbacks=[stop])
    assert stop.key == "test_loss" and stop.best == r.test_loss[0]
    assert any("early stopping watches test_loss" in s for s in lines)
    with pytest.raises(GraphError, match="patience"):
        cbs.EarlyStopping(patience=0)
    with pytest.raises(GraphError, match="monitor"):
        cbs.EarlyStopping(monitor="lr")


def test_csv_log_rows_and_resume(tiny, tmp_path):
    path, ck = tmp_path / "run.csv", tmp_path / "ck.npz"
    run(tiny, epochs=2, callbacks=[cbs.CSVLogger(path)], save=ck, lr_schedule="cosine")
    rows = list(csv.DictReader(path.open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and list(rows[0]) == list(cbs.LOG_FIELDS)
    assert rows[0]["val_loss"] == "" and float(rows[1]["lr"]) < float(rows[0]["lr"])   # no validation; cosine
    r, _ = run(tiny, epochs=3, resume=ck, callbacks=[cbs.CSVLogger(path)])
    rows = list(csv.DictReader(path.open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]         # the earlier epochs come from the checkpoint
    assert float(rows[2]["train_loss"]) == pytest.approx(r.train_loss[2], rel=1e-5)
    with pytest.raises(gc.OutputError):
        cbs.CSVLogger(tmp_path / "no" / "dir" / "run.csv")


def read_events(path):
    """Scalars (tag, step, value) of a TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2
    out, raw = [], path.read_bytes()
    f = io.BytesIO(raw)
    while True:
        head = f.read(12)
        if len(head) < 12:
            break
        (n,) = struct.unpack("<Q", head[:8])
        ev = event_pb2.Event.FromString(f.read(n))
        f.read(4)
        for v in ev.summary.value:
            out.append((v.tag, ev.step, v.simple_value))
    return out


def test_tensorboard_scalars(tiny, tmp_path):
    pytest.importorskip("tensorboardX")
    r, _ = run(tiny, epochs=2, validation=0.2, callbacks=[cbs.TensorBoard(tmp_path / "tb")])
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = read_events(files[0])
    by_tag = {}
    for tag, step, value in scalars:
        by_tag.setdefault(tag, []).append((step, value))
    assert {"loss/train", "loss/val", "loss/test", "accuracy/val", "accuracy/test", "lr", "loss/step"} <= set(by_tag)
    assert [s for s, _ in by_tag["loss/train"]] == [1, 2]
    assert [v for _, v in by_tag["loss/train"]] == pytest.approx(r.train_loss, rel=1e-6)
    assert len(by_tag["loss/step"]) == len(r.step_losses)


def test_tensorboard_without_the_package_says_how(monkeypatch, tmp_path):
    import builtins
    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith(("tensorboardX", "torch.utils.tensorboard")):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(GraphError, match=r"graphc\[tensorboard\]"):
        cbs.TensorBoard(tmp_path / "tb")


def test_plots_dir(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = cli.main(["train", "mlp", "--epochs", "2", "--batch", "64", "--backend", "reference", "--no-progress",
                   "--validation", "0.2", "--plots", str(tmp_path / "plots"), "--log", str(tmp_path / "log.csv")])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("curves.png", "confusion.png"):
        p = tmp_path / "plots" / name
        assert p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 5000 and str(p) in out
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3


def test_progress_bars_and_the_compile_phase(tiny, capsys, monkeypatch):
    from graphc.backends.numba import executor as nexec
    from graphc.progress import progress_bar
    said = []                                          # (progress, kernels compiled) of each precompile
    real = nexec.precompile_steps

    def spy(steps, progress, label):
        stats = real(steps, progress, label)
        said.append((progress, stats["compiled"]))
        return stats
    monkeypatch.setattr(nexec, "precompile_steps", spy)
    bar = progress_bar(True, total=3)
    assert bar.mininterval == 5.0                      # stderr is not a terminal here: redrawn every 5 s
    bar.close()
    assert progress_bar(False, total=3) is None
    r, lines = run(tiny, epochs=1, backend="numba", progress=True)
    compiled = [i for i, s in enumerate(lines) if s.startswith("compiled ")]
    epoch = [i for i, s in enumerate(lines) if s.startswith("epoch 1/1")]
    assert len(compiled) == 1 and compiled[0] < epoch[0]
    assert "kernels in" in lines[compiled[0]] and "(training step and evaluation" in lines[compiled[0]]
    err = capsys.readouterr().err
    assert "compiling" in err and "epoch 1/1" in err          # the bars went to stderr
    # the phase's executors said nothing of their own amid its bar; nothing was left to compile after it
    assert [p for p, _ in said[:2]] == [None, None] and all(n == 0 for _, n in said[2:]), said
