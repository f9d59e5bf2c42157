#!/usr/bin/env python
"""What the label-range check costs in the numba softmax-cross-entropy kernel (hardening issue): the
kernel as shipped against the same loop without the check, interleaved in one process, best of 30.

    python examples/label_check_cost.py
"""
import time

import numpy as np
from numba import njit

from graphc.backends.numba.kernels.loss import _log_sum_exp, _row_max, sce_int_k


@njit(nogil=True, error_model="numpy")
def sce_without_check(z, labels, out):
    M = z.shape[0]
    tot = 0.0
    for i in range(M):
        m = _row_max(z, i)
        tot += (z[i, labels[i]] - m) - _log_sum_exp(z, i, m)
    out[0] = 0.0 - tot / M
    return -1


def best_us(f, args, calls, rounds=30):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            f(*args)
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def main():
    rng = np.random.default_rng(0)
    for rows in (128, 1):
        args = (rng.standard_normal((rows, 10)).astype(np.float32), rng.integers(0, 10, rows),
                np.zeros(1, np.float32))
        sce_int_k(*args), sce_without_check(*args)                  # compile both first
        calls = 2000 if rows > 1 else 20000
        pairs = [(best_us(sce_int_k, args, calls, 1), best_us(sce_without_check, args, calls, 1)) for _ in range(30)]
        with_check, without = min(p[0] for p in pairs), min(p[1] for p in pairs)
        print(f"{rows} rows x 10 classes: with the check {with_check:.3f} us, without {without:.3f} us "
              f"({with_check / without:.3f}x)")


if __name__ == "__main__":
    main()
