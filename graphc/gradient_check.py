"""gradcheck: the backward graph against central finite differences, in float64."""
from __future__ import annotations

import numpy as np

from graphc.errors import GradError


class GradcheckReport:
    """Relative error per checked value: ||analytic - numeric|| / max(||analytic||, ||numeric||, tiny)."""

    def __init__(self, errors, tol, analytic, numeric):
        self.errors, self.tol, self.analytic, self.numeric = errors, tol, analytic, numeric

    @property
    def worst(self) -> float:
        return max(self.errors.values()) if self.errors else 0.0

    @property
    def ok(self) -> bool:
        return self.worst <= self.tol

    def __bool__(self):
        return self.ok

    def __str__(self):
        w = max([len(k) for k in self.errors] + [5])
        lines = [f"{'value':<{w}}  relative error"]
        lines += [f"{k:<{w}}  {e:.3e}{'  FAIL' if e > self.tol else ''}" for k, e in self.errors.items()]
        lines.append(f"worst {self.worst:.3e} (tolerance {self.tol:.1e}): {'ok' if self.ok else 'FAILED'}")
        return "\n".join(lines)


def gradcheck(graph, feeds, wrt=None, loss=None, eps=1e-6, tol=1e-6, max_elements=64, seed=0,
              raise_on_failure=True, backend="reference", training=False):
    """Compares gc.grad(graph) with central differences (float64) for each value in wrt (default: all
    params; input names allowed). Large tensors are checked at up to `max_elements` random positions.
    Returns a GradcheckReport (truthy when it passes); raises GradError on failure unless
    raise_on_failure=False. training=True checks the training-mode graph (batch norm on batch
    statistics, dropout on with a fixed mask)."""
    import graphc as gc
    gg = gc.grad(graph, wrt=wrt, loss=loss)
    names = [gg.nx.nodes[o]["grad_of"] for o in gg.outputs]
    loss_name = gg.loss
    fwd = gc.compile(graph, backend=backend, dtype="float64")
    bwd = gc.compile(gg, backend=backend, dtype="float64")
    feeds = {k: np.array(v) for k, v in feeds.items()}
    for k, (shape, dt) in fwd.input_types.items():
        if k in feeds and dt.startswith("float"):
            feeds[k] = feeds[k].astype(np.float64)
    grads = bwd.run(feeds, training=training)
    rng = np.random.default_rng(seed)

    def f():
        return float(fwd.run(feeds, outputs=[loss_name], training=training)[loss_name])

    errors, analytic, numeric = {}, {}, {}
    for name in names:
        target = fwd.state[name] if name in fwd.state else feeds[name]
        if target.dtype.kind != "f":
            raise GradError(f"cannot finite-difference integer value {name!r}")
        a = grads[f"grad/{name}"].astype(np.float64)
        flat = target.reshape(-1)   # a view: perturbing it perturbs the executable's state / the feed
        idx = np.arange(flat.size)
        if flat.size > max_elements:
            idx = np.sort(rng.choice(flat.size, max_elements, replace=False))
        num = np.empty(len(idx))
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + eps
            up = f()
            flat[i] = old - eps
            down = f()
            flat[i] = old
            num[j] = (up - down) / (2 * eps)
        an = a.reshape(-1)[idx]
        scale = max(np.linalg.norm(an), np.linalg.norm(num), 1e-10)
        errors[name] = float(np.linalg.norm(an - num) / scale)
        analytic[name], numeric[name] = an, num
    report = GradcheckReport(errors, tol, analytic, numeric)
    if not report.ok and raise_on_failure:
        raise GradError("gradient check failed:\n" + str(report))
    return report
