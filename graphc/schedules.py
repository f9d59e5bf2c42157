"""Learning-rate schedules as graph updates: the factor multiplying the base learning rate is a small
graph of gate ops over a step counter that is graph state, so a schedule runs inside every
``exe.step`` (any backend), is saved in checkpoints with the parameters, and resumes exactly.

    opt = gc.optim.Adam(1e-3, schedule=gc.schedules.Warmup(100, then=gc.schedules.Cosine(900)))
    exe = gc.compile(g, backend="numba", optimizer=opt)     # state: optim/lr (base), optim/sched/step

    gc.schedules.parse("warmup:1+cosine", steps_per_epoch=63, epochs=10)   # what --lr-schedule reads

Each schedule gives the factor for ``e``, the number of steps done before the current one (0 at the
first step), twice: ``factor(e)`` in plain Python (the oracle the tests compare the graph against) and
``build(g, e)`` as graph ops. The learning rate of a step is ``optim/lr * factor(e)``; setting
``exe.state["optim/lr"]`` changes the base rate.

- ``StepDecay(every, gamma)``: ``gamma ** floor(e / every)`` (torch's StepLR).
- ``Cosine(total, min_factor)``: ``min + (1 - min) (1 + cos(pi min(e, total) / total)) / 2``
  (torch's CosineAnnealingLR, not restarted).
- ``Warmup(steps, then)``: ``min(1, (e + 1) / steps)``, times ``then`` (if any) run on ``e - steps``
  once the warm-up is over.
"""
from __future__ import annotations

import math

from graphc.errors import GraphError

__all__ = ["Schedule", "Constant", "StepDecay", "Cosine", "Warmup", "parse", "SPECS", "STEP_STATE"]

#: the graph state counting the steps a schedule has seen
STEP_STATE = "optim/sched/step"
SPECS = ("constant", "step:EPOCHS[:GAMMA]", "cosine[:MIN_FACTOR]", "warmup:EPOCHS[+step...|+cosine...]")


def _positive(owner, what, v, integer=True):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok or (integer and int(v) != v):
        kind = "a positive integer" if integer else "a positive number"
        raise GraphError(f"{owner}: {what} must be {kind}, got {v!r}")
    return int(v) if integer else float(v)


class Schedule:
    """A learning-rate factor as a function of the steps done; subclasses give factor() and build()."""
    name = "schedule"

    def factor(self, e: int) -> float:
        raise NotImplementedError

    def build(self, g, e):
        """The factor as graph ops over the value e (a scalar graph value: the steps done)."""
        raise NotImplementedError

    def attach(self, g, lr):
        """Adds the step counter (state) and its update to training graph g; returns lr * factor."""
        with g.role("forward"):
            import numpy as np
            step = g.param(STEP_STATE, value=np.asarray(0.0, dtype=g.dtype), trainable=False)
        with g.role("update"), g.rule(f"schedule:{self.name}"):
            g.updates[step.name] = g.add(step, g.scalar(1.0), name=f"update/{STEP_STATE}").name
            return g.mul(lr, self.build(g, step), name="optim/lr_scheduled")

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class Constant(Schedule):
    name = "constant"

    def factor(self, e):
        return 1.0

    def build(self, g, e):
        return g.scalar(1.0)


class StepDecay(Schedule):
    """gamma ** floor(e / every): the rate is multiplied by gamma every `every` steps."""
    name = "step"

    def __init__(self, every, gamma=0.1):
        self.every = _positive("StepDecay", "every", every)
        self.gamma = _positive("StepDecay", "gamma", gamma, integer=False)

    def factor(self, e):
        return self.gamma ** math.floor(e / self.every)

    def build(self, g, e):
        k = g.floor(g.div(e, g.scalar(float(self.every))))     # exact: integers divided by an integer
        return g.exp(g.mul(k, g.scalar(math.log(self.gamma))))


class Cosine(Schedule):
    """Half a cosine from 1 down to min_factor over `total` steps, then min_factor."""
    name = "cosine"

    def __init__(self, total, min_factor=0.0):
        self.total = _positive("Cosine", "total", total)
        if not (isinstance(min_factor, (int, float)) and 0 <= min_factor <= 1):
            raise GraphError(f"Cosine: min_factor must be a number in [0, 1], got {min_factor!r}")
        self.min_factor = float(min_factor)

    def factor(self, e):
        u = min(max(e / self.total, 0.0), 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * u))

    def build(self, g, e):
        u = g.clip(g.div(e, g.scalar(float(self.total))), 0.0, 1.0)
        half = g.mul(g.add(g.cos(g.mul(u, g.scalar(math.pi))), g.scalar(1.0)), g.scalar(0.5))
        return g.add(g.mul(half, g.scalar(1 - self.min_factor)), g.scalar(self.min_factor))


class Warmup(Schedule):
    """Linear warm-up from 1/steps to 1 over `steps` steps; then `then` (None: constant) from its start."""
    name = "warmup"

    def __init__(self, steps, then=None):
        self.steps = _positive("Warmup", "steps", steps)
        if then is not None and not isinstance(then, Schedule):
            raise GraphError(f"Warmup: then must be a gc.schedules schedule or None, got {type(then).__name__}")
        self.then = then

    def factor(self, e):
        warm = min(1.0, (e + 1) / self.steps)
        return warm * (self.then.factor(max(e - self.steps, 0)) if self.then is not None else 1.0)

    def build(self, g, e):
        warm = g.clip(g.div(g.add(e, g.scalar(1.0)), g.scalar(float(self.steps))), 0.0, 1.0)
        if self.then is None:
            return warm
        after = g.clip(g.sub(e, g.scalar(float(self.steps))), 0.0, math.inf)
        return g.mul(warm, self.then.build(g, after))


def _number(text, spec, what):
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or v <= 0:
        raise GraphError(f"--lr-schedule {spec!r}: {what} must be a positive number, got {text!r}")
    return v


def parse(spec, steps_per_epoch, epochs):
    """A schedule from the --lr-schedule text, with its lengths in epochs turned into steps:
    "constant", "step:EPOCHS[:GAMMA]" (gamma 0.1 by default), "cosine[:MIN_FACTOR]" (over the whole
    run, or what is left of it after a warm-up), "warmup:EPOCHS" alone or followed by "+step:..." or
    "+cosine". EPOCHS may be a fraction (warmup:0.5). None or a Schedule is returned as is."""
    if spec is None or isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise GraphError(f"--lr-schedule must be one of {', '.join(SPECS)}, got {spec!r}")
    total = max(1, int(steps_per_epoch) * int(epochs))

    def steps(text, what):
        return max(1, round(_number(text, spec, what) * steps_per_epoch))

    head, _, rest = spec.strip().partition("+")
    kind, *args = head.split(":")
    if kind == "warmup":
        if len(args) != 1:
            raise GraphError(f"--lr-schedule {spec!r}: write warmup:EPOCHS, e.g. warmup:1 or warmup:1+cosine")
        n = steps(args[0], "the warm-up length")
        then = _single(rest, spec, steps, max(1, total - n)) if rest else None
        return Warmup(n, then)
    if rest:
        raise GraphError(f"--lr-schedule {spec!r}: only a warm-up is followed by another schedule (warmup:1+cosine)")
    return _single(head, spec, steps, total)


def _single(text, spec, steps, total):
    kind, *args = text.split(":")
    if kind == "constant" and not args:
        return Constant()
    if kind == "step" and 1 <= len(args) <= 2:
        gamma = _number(args[1], spec, "gamma") if len(args) == 2 else 0.1
        return StepDecay(steps(args[0], "the decay interval"), gamma)
    if kind == "cosine" and len(args) <= 1:
        try:
            low = float(args[0]) if args else 0.0
        except ValueError:
            low = math.nan
        if not 0 <= low <= 1:
            raise GraphError(f"--lr-schedule {spec!r}: the cosine's MIN_FACTOR must be in [0, 1], got {args[0]!r}")
        return Cosine(total, low)
    raise GraphError(f"unknown --lr-schedule {spec!r}; choose one of {', '.join(SPECS)}")
