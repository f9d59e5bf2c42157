"""Learning-rate schedules (graphc.schedules): the factor the graph computes equals the Python oracle
on every step, on the reference and numba backends; the step counter is graph state, so a schedule
checkpoints and a resumed run equals an uninterrupted one; --lr-schedule's specs and errors."""
import numpy as np
import pytest

import graphc as gc
from graphc import data, schedules
from graphc.checkpoint import read_checkpoint
from graphc.errors import GraphError
from graphc.train import train


def linear_graph():
    """loss = sum(x * w): dL/dw = x, so SGD moves w by exactly lr * x each step."""
    g = gc.Graph("lin", dtype="float64")
    x = g.input("x", (None, 3))
    w = g.param("w", value=np.zeros(3))
    g.output(g.sum(g.mul(x, w), name="loss"))
    return g


SCHEDULES = [schedules.StepDecay(3, 0.5), schedules.Cosine(7, 0.1), schedules.Warmup(4, schedules.Cosine(6)),
             schedules.Warmup(3), schedules.Warmup(2, schedules.StepDecay(2, 0.1)), schedules.Constant()]


def applied_rates(exe, steps):
    x = np.ones((1, 3))
    rates = []
    for _ in range(steps):
        before = np.array(exe.state["w"])
        exe.step({"x": x})
        rates.append(float((before - exe.state["w"])[0]))
    return rates


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_the_graph_computes_the_oracle_factor(backend):
    g = linear_graph()
    for sch in SCHEDULES:
        exe = gc.compile(g, backend=backend, optimizer=gc.optim.SGD(0.1, schedule=sch))
        assert "optim/sched/step" in exe.state and "optim/lr" in exe.state
        got = applied_rates(exe, 12)
        want = [0.1 * sch.factor(e) for e in range(12)]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=repr(sch))
        assert float(exe.state["optim/sched/step"]) == 12


def test_oracle_values_by_hand():
    assert [schedules.StepDecay(2, 0.5).factor(e) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    c = schedules.Cosine(4)
    assert c.factor(0) == 1 and c.factor(2) == pytest.approx(0.5) and c.factor(4) == 0 and c.factor(9) == 0
    w = schedules.Warmup(4)
    assert [w.factor(e) for e in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    wc = schedules.Warmup(2, schedules.Cosine(2))
    assert [round(wc.factor(e), 6) for e in range(5)] == [0.5, 1, 1, 0.5, 0]      # the cosine starts at step 2


def test_base_rate_stays_settable_and_adam_takes_a_schedule():
    exe = gc.compile(linear_graph(), optimizer=gc.optim.SGD(0.1, schedule=schedules.StepDecay(1, 0.5)))
    exe.state["optim/lr"] = np.array(1.0)
    assert applied_rates(exe, 3) == pytest.approx([1.0, 0.5, 0.25])
    exe = gc.compile(linear_graph(), optimizer=gc.optim.Adam(0.1, schedule=schedules.Warmup(10)))
    first = applied_rates(exe, 1)[0]
    assert first == pytest.approx(0.01, rel=1e-6)       # Adam's first step moves by lr; warm-up: lr / 10


def test_parse_specs_in_epochs():
    s = schedules.parse("step:2:0.5", steps_per_epoch=10, epochs=6)
    assert isinstance(s, schedules.StepDecay) and (s.every, s.gamma) == (20, 0.5)
    s = schedules.parse("cosine", 10, 6)
    assert isinstance(s, schedules.Cosine) and s.total == 60 and s.min_factor == 0
    s = schedules.parse("warmup:0.5+cosine:0.1", 10, 6)
    assert isinstance(s, schedules.Warmup) and s.steps == 5 and s.then.total == 55 and s.then.min_factor == 0.1
    assert schedules.parse(None, 10, 6) is None and isinstance(schedules.parse("constant", 10, 1), schedules.Constant)
    for bad in ("linear", "step", "step:0", "step:1:-2", "cosine:2", "cosine:x", "warmup", "cosine+step:1", ""):
        with pytest.raises(GraphError, match="lr-schedule"):
            schedules.parse(bad, 10, 6)
    with pytest.raises(GraphError, match="schedule must be"):
        gc.optim.SGD(0.1, schedule="cosine")


@pytest.fixture(scope="module")
def tiny():
    full = data.load_mnist5k()
    return data.Dataset(full.x_train[:192], full.y_train[:192], full.x_test[:64], full.y_test[:64], "mnist5k-tiny")


def run(ds, **kw):
    lines = []
    kw = {"backend": "reference", "batch": 32, "progress": False, "optimizer": "sgd", "lr": 0.05, **kw}
    return train("mlp", data=ds, log=lines.append, **kw), lines


def test_train_with_a_schedule_checkpoints_and_resumes_exactly(tiny, tmp_path):
    straight, lines = run(tiny, epochs=3, lr_schedule="step:1:0.5")
    assert straight.learning_rate == pytest.approx([0.05, 0.025, 0.0125])   # each epoch's last step
    assert any(", lr 0.025" in s for s in lines)
    ck = tmp_path / "s.npz"
    run(tiny, epochs=1, lr_schedule="step:1:0.5", save=ck)
    arrays, meta = read_checkpoint(ck)
    assert meta["lr_schedule"] == "step:1:0.5" and float(arrays["optim/sched/step"]) == 6
    resumed, _ = run(tiny, epochs=3, resume=ck)                  # the schedule comes from the checkpoint
    assert resumed.learning_rate == straight.learning_rate
    assert resumed.step_losses == straight.step_losses
    for k in straight.exe.state:
        np.testing.assert_array_equal(resumed.exe.state[k], straight.exe.state[k])
    ck2 = tmp_path / "plain.npz"
    run(tiny, epochs=1, save=ck2)
    with pytest.raises(gc.CheckpointError, match="learning-rate schedule differs"):
        run(tiny, epochs=2, resume=ck2, lr_schedule="cosine")
