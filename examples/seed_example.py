"""The course unit's worked CNN example (the course notes), one SGD step at learning rate 0.5, every number.

    python examples/seed_example.py

3x3 input X, one 2x2 filter F = [[0.9, 0.1], [0.1, 0.9]] with bias b1 = 0.1, ReLU, flatten to C1..C4,
dense 2 (ReLU) -> h, dense 2 -> logits, softmax O, cross-entropy against (1, 0). The forward values
and the gradients come from graphc's gate-rule autodiff (gc.grad); the updated weights from one step
of a training executable (gc.optim.SGD(0.5)). Each is printed next to the value the course gives
(to its 3-4 digits); the script exits 1 if any differs.
"""
import sys

import numpy as np

import graphc as gc
from graphc import models

# The values of the course notes ("The unit's worked CNN example").
COURSE = {
    "C": [1.9, 0.3, 0.3, 1.9],
    "h": [1.3, 3.06],
    "logits": [1.042, 1.914],
    "O": [0.295, 0.705],
    "dL/dlogits": [-0.705, 0.705],
    "dL/dh": [0.141, 0.141],
    "dL/dC": [0.0846, 0.1128, 0.141, 0.1692],
    "dL/dF": [0.2538, 0.2538, 0.2538, 0.2538],
    "dL/db1": [0.5076],
    "F+": [0.7731, -0.0269, -0.0269, 0.7731],
    "b1+": [-0.1538],
    "wo+": [0.558, 1.278, -0.158, -0.678],
    "bo+": [0.652, -0.052],
    "bh+": [0.1295, 0.1295],
}
TOL = 2e-3          # the course rounds to 3-4 digits


def main():
    np.set_printoptions(precision=4, suppress=True)
    feeds = {"x": models.SEED_X, "labels": models.SEED_LABELS}
    graph = models.seed_cnn()                      # float64, the course's exact weights

    print("The course's worked CNN example in graphc")
    print("  X  =", models.SEED_X[0, 0].tolist(), "  label one-hot (1, 0)")
    for name in graph.param_names:
        print(f"  {name:<9} = {np.asarray(graph.params[name]).ravel().tolist()}")

    # Forward values and the gradient of the loss with respect to values and parameters (gate rules).
    wrt = ["logits", "h", "C", "conv.w", "conv.b", "hidden.w", "hidden.b", "out.w", "out.b"]
    bwd = gc.grad(graph, wrt=wrt)
    vals = gc.compile(bwd, backend="reference").run(feeds, outputs=["C", "h", "logits", "loss"] + bwd.outputs)
    logits = vals["logits"].ravel()
    O = np.exp(logits - logits.max())
    O /= O.sum()

    # One SGD step at learning rate 0.5.
    exe = gc.compile(graph, backend="reference", optimizer=gc.optim.SGD(0.5))
    loss = exe.step(feeds)
    new = exe.params

    ours = {
        "C": vals["C"], "h": vals["h"], "logits": logits, "O": O,
        "dL/dlogits": vals["grad/logits"], "dL/dh": vals["grad/h"], "dL/dC": vals["grad/C"],
        "dL/dF": vals["grad/conv.w"], "dL/db1": vals["grad/conv.b"],
        "F+": new["conv.w"], "b1+": new["conv.b"], "wo+": new["out.w"], "bo+": new["out.b"],
        "bh+": new["hidden.b"],
    }
    print(f"\nloss = -log O1 = {float(vals['loss']):.4f}  (the step's loss: {loss:.4f})")
    print("\n  value         graphc                                    course                              ok")
    bad = 0
    for key, want in COURSE.items():
        got = np.asarray(ours[key], dtype=np.float64).ravel()
        ok = got.shape == (len(want),) and np.allclose(got, want, atol=TOL)
        bad += not ok
        print(f"  {key:<12}  {str(np.round(got, 4).tolist()):<40}  {str(want):<34}  {'yes' if ok else 'NO'}")
    print("\nalso (not in the course's list):")
    print("  dL/dwh  =", np.round(vals["grad/hidden.w"], 4).tolist())
    print("  dL/dwo  =", np.round(vals["grad/out.w"], 4).tolist(), "  dL/dbo =", np.round(vals["grad/out.b"], 4).tolist())
    print("  dL/dbh  =", np.round(vals["grad/hidden.b"], 4).tolist())
    print("  wh+     =", np.round(new["hidden.w"], 4).tolist())
    if bad:
        print(f"\n{bad} value(s) differ from the course")
        return 1
    print("\nevery value matches the course (to its 3-4 digits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
