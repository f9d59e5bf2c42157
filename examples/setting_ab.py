"""A/B of one module-level setting of the numba backend on a whole model: two executables in one process,
built with the setting at each of two values, timed in alternating blocks (the order reversed every
other round, so a drifting machine weighs on both alike), their outputs checked to be bit for bit the
same. The command behind the prefetch figures in backends/numba/conv/channels.py's doc:

    python examples/setting_ab.py resnet18 --batch 1 \\
        graphc.backends.numba.conv.channels PREFETCH_MIN_BYTES 4611686018427387904 1048576

Prints the median step of each and the median of the per-round ratios B / A. The setting must be read
when the executable binds (its first run), as the conv plans' constants are. Run it on a quiet machine
(`uptime`).
"""
import argparse
import importlib
import time

import numpy as np

import graphc as gc
from graphc.bench import make_feeds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("module", help="the module holding the setting, e.g. graphc.backends.numba.conv.channels")
    ap.add_argument("name", help="the setting's name in it")
    ap.add_argument("a", type=int, help="value A (an integer)")
    ap.add_argument("b", type=int, help="value B")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--runs", type=int, default=15, help="runs a block")
    ap.add_argument("--threads", type=int, default=2, help="Numba threads of both (fixed: not chosen per run)")
    args = ap.parse_args()
    mod = importlib.import_module(args.module)
    if not hasattr(mod, args.name):
        ap.error(f"{args.module} has no {args.name}")
    g = gc.models.load(args.model)
    feeds = make_feeds(g, args.batch)
    exes, outs = {}, {}
    saved = getattr(mod, args.name)
    try:
        for key, value in (("A", args.a), ("B", args.b)):
            setattr(mod, args.name, value)
            exes[key] = gc.compile(g, backend="numba", threads=args.threads)
            outs[key] = exes[key].run(feeds)              # binds (reads the setting) and compiles
            exes[key].run(feeds)
    finally:
        setattr(mod, args.name, saved)
    same = all(np.array_equal(outs["A"][k], outs["B"][k]) for k in outs["A"])
    ms = {"A": [], "B": []}
    for r in range(args.rounds):
        for key in (("A", "B") if r % 2 == 0 else ("B", "A")):
            ts = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                exes[key].run(feeds)
                ts.append(time.perf_counter() - t0)
            ms[key].append(1e3 * float(np.median(ts)))
    ratios = np.array(ms["B"]) / np.array(ms["A"])
    print(f"{args.model} batch {args.batch}: {args.name} = {args.a}: {np.median(ms['A']):.2f} ms, "
          f"= {args.b}: {np.median(ms['B']):.2f} ms; B / A per round: median {np.median(ratios):.3f} "
          f"({ratios.min():.3f}-{ratios.max():.3f}); outputs {'the same bits' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
