"""Times the numba backend's conv strategies (direct, im2col, winograd) side by side on one geometry, as
a tuning run does (best of interleaved runs after a warm-up call each), and prints the static rule's
choice: the command behind the figures in conv/strategy.py's docstrings.

    python examples/conv_strategies.py                                  # VGG16 b2's 256 -> 256 on 56x56
    python examples/conv_strategies.py --x 16 64 56 56 --w 64 64 3 3 --op conv2d_dw
    python examples/conv_strategies.py --x 2 64 224 224 --w 64 64 3 3 --op conv2d_relu_maxpool --pool 2 2

Run it on a quiet machine (`uptime`); the timings use Numba's current thread count (all cores).
"""
import argparse

import numpy as np

from graphc.backends.numba.conv import strategy


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--x", type=int, nargs=4, default=[2, 256, 56, 56], metavar=("N", "C", "H", "W"))
    ap.add_argument("--w", type=int, nargs=4, default=[256, 256, 3, 3], metavar=("K", "C", "KH", "KW"))
    ap.add_argument("--op", default="conv2d", choices=["conv2d", "conv2d_relu_maxpool", "conv2d_dx", "conv2d_dw"])
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--pad", type=int, default=1)
    ap.add_argument("--pool", type=int, nargs=2, default=None, metavar=("SIZE", "STRIDE"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    pads = (a.pad,) * 4
    pool = tuple(a.pool) if a.pool else ((2, 2) if a.op == "conv2d_relu_maxpool" else None)
    fns = strategy._candidates(a.op, tuple(a.x), tuple(a.w), a.stride, pads, np.dtype(a.dtype), pool)
    best = strategy._time_candidates(fns, a.repeats)
    for name, s in sorted(best.items(), key=lambda kv: kv[1]):
        print(f"{name:9s} {s * 1e3:8.2f} ms")
    print("static rule:", strategy.static_rule(a.op, a.stride, tuple(a.w), x_shape=tuple(a.x), dtype=a.dtype),
          "| a tuning run would keep:", strategy._pick(best))


if __name__ == "__main__":
    main()
