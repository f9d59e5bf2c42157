"""Benchmark of the numba backend's convolution kernels (graphc.backends.numba.conv).

For the conv layers of the MNIST models (mnist_convnet, LeNet-5): median (and best) milliseconds, GFLOP/s
(2*N*K*C*KH*KW*Ho*Wo per call, the same count for forward, dL/dX and dL/dW), the fraction of the
SGEMM roof (numpy matmul 1024x1024 float32, measured in the same run, before and after), for both
strategies, plus the one choose_conv_strategy picks.  "first" is the first call in this process:
generation + compilation with an empty kernel cache, a disk-cache load with a warm one.

    python examples/bench_conv_kernels.py                  # all layers, 2 threads
    python examples/bench_conv_kernels.py --only mnist2 --repeats 30
    python examples/bench_conv_kernels.py --clock cpu      # 1 thread, CPU time: for a loaded machine
    GRAPHC_CACHE_DIR=$(mktemp -d) python examples/bench_conv_kernels.py   # cold compile times

Run nothing else meanwhile: this machine's figures move +-30 % with other load; compare ratios
taken within one run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# name: (N, C, K, H, W, KH, KW, stride, pads, pool)
LAYERS = {
    "mnist2": (128, 32, 64, 13, 13, 3, 3, 1, (0, 0, 0, 0), (2, 2)),   # mnist_convnet conv2 (+pool)
    "mnist1": (128, 1, 32, 28, 28, 3, 3, 1, (0, 0, 0, 0), (2, 2)),    # mnist_convnet conv1 (+pool)
    "lenet1": (64, 1, 6, 28, 28, 5, 5, 1, (2, 2, 2, 2), (2, 2)),      # LeNet-5 C1 (+pool)
    "lenet2": (64, 6, 16, 14, 14, 5, 5, 1, (0, 0, 0, 0), (2, 2)),     # LeNet-5 C3 (+pool)
    "mnist2_b1": (1, 32, 64, 13, 13, 3, 3, 1, (0, 0, 0, 0), (2, 2)),  # batch-1 inference
}
OPS = ("fused", "fwd", "dx", "dw")


CLOCK = time.perf_counter


def times_ms(fn, repeats, min_time=0.0):
    """(median, best) milliseconds over at least ``repeats`` calls and ``min_time`` seconds."""
    ts = []
    t_end = time.perf_counter() + min_time
    while len(ts) < repeats or time.perf_counter() < t_end:
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts))


def sgemm_gflops(n=1024, repeats=15):
    """(median, best) GFLOP/s of numpy's float32 matmul n x n."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    for _ in range(3):
        a @ b
    med, best = times_ms(lambda: a @ b, repeats)
    return 2 * n ** 3 / (med * 1e-3) / 1e9, 2 * n ** 3 / (best * 1e-3) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(LAYERS), help="layers to run")
    ap.add_argument("--ops", nargs="*", choices=OPS, default=list(OPS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time with ONE thread for Numba and BLAS (robust to other "
                         "load on the machine, which only delays a single thread)")
    args = ap.parse_args(argv)

    from graphc.backends import kernel_cache
    from graphc.backends.numba import conv as nc
    import numba
    global CLOCK
    if args.clock == "cpu":
        from threadpoolctl import threadpool_limits
        args.threads = 1
        CLOCK = time.process_time
        threadpool_limits(1, user_api="blas")
    if args.threads:
        numba.set_num_threads(args.threads)
    print(f"numba {numba.__version__}, numpy {np.__version__}, {numba.get_num_threads()} threads, "
          f"clock {args.clock}, kernel cache {kernel_cache.kernel_cache_dir()}")
    roof0 = sgemm_gflops()
    print(f"SGEMM roof (numpy matmul 1024^2 float32): median {roof0[0]:.1f}, best {roof0[1]:.1f} GFLOP/s")
    print(f"load average: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    rows = []
    rng = np.random.default_rng(0)
    for name in args.only or list(LAYERS):
        N, C, K, H, W, KH, KW, s, pads, (ps, pst) = LAYERS[name]
        x = rng.standard_normal((N, C, H, W), dtype=np.float32)
        w = (rng.standard_normal((K, C, KH, KW)) * 0.2).astype(np.float32)
        b = (rng.standard_normal(K) * 0.1).astype(np.float32)
        Ho, Wo = (H + pads[0] + pads[1] - KH) // s + 1, (W + pads[2] + pads[3] - KW) // s + 1
        dy = rng.standard_normal((N, K, Ho, Wo), dtype=np.float32)
        flop = 2.0 * N * K * C * KH * KW * Ho * Wo
        for op in args.ops:
            if op == "dx" and C == 1 and name != "lenet1":
                continue           # the input gradient of the first layer is not needed in training
            calls = {
                "fused": lambda st: nc.conv2d_relu_maxpool(x, w, b, s, pads, ps, pst, save_route=True,
                                                           strategy=st),
                "fwd": lambda st: nc.conv2d(x, w, b, s, pads, relu=True, strategy=st),
                "dx": lambda st: nc.conv2d_dx(dy, w, s, pads, (H, W), strategy=st),
                "dw": lambda st: nc.conv2d_dw(x, dy, s, pads, (KH, KW), strategy=st),
            }
            fn = calls[op]
            res = {}
            for st in nc.STRATEGIES:
                t0 = time.perf_counter()
                fn(st)
                first = time.perf_counter() - t0
                med, best = times_ms(lambda: fn(st), args.repeats, min_time=0.2)
                res[st] = (med, best, first)
            opname = {"fused": "conv2d_relu_maxpool", "fwd": "conv2d", "dx": "conv2d_dx",
                      "dw": "conv2d_dw"}[op]
            t0 = time.perf_counter()
            chosen = nc.choose_conv_strategy(x.shape, w.shape, s, pads, np.float32, op=opname,
                                             pool=(ps, pst) if op == "fused" else None)
            choose_s = time.perf_counter() - t0
            rows.append((name, op, flop, res, chosen, choose_s))
            d, i = res["direct"], res["im2col"]
            print(f"{name:10s} {op:5s} direct {d[0]:8.3f} ms (best {d[1]:8.3f}, first {d[2]:5.2f} s)"
                  f" | im2col {i[0]:8.3f} ms (best {i[1]:8.3f}, first {i[2]:5.2f} s)"
                  f" | chosen {chosen} ({choose_s:.2f} s)", flush=True)
    roof1 = sgemm_gflops()
    roof = (0.5 * (roof0[0] + roof1[0]), 0.5 * (roof0[1] + roof1[1]))
    print(f"SGEMM roof after: median {roof1[0]:.1f}, best {roof1[1]:.1f}; using the means "
          f"{roof[0]:.1f} / {roof[1]:.1f} GFLOP/s (median / best)")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print()
    print("GF/s from the median time (best time in brackets); % of SGEMM: median/median (best/best)")
    print()
    print("| layer | op | shape | MFLOP | direct ms | direct GF/s | im2col ms | im2col GF/s | chosen | "
          "chosen % of SGEMM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, op, flop, res, chosen, _ in rows:
        N, C, K, H, W, KH, KW, s, pads, pool = LAYERS[name]
        shape = f"N{N} C{C}->K{K} {H}x{W} {KH}x{KW} s{s} p{pads[0]}"
        if op == "fused":
            shape += f" pool{pool[0]}/{pool[1]}"
        g = {st: (flop / res[st][0] / 1e6, flop / res[st][1] / 1e6) for st in res}
        print(f"| {name} | {op} | {shape} | {flop / 1e6:.1f} | {res['direct'][0]:.3f} | "
              f"{g['direct'][0]:.1f} ({g['direct'][1]:.1f}) | {res['im2col'][0]:.3f} | "
              f"{g['im2col'][0]:.1f} ({g['im2col'][1]:.1f}) | {chosen} | "
              f"{100 * g[chosen][0] / roof[0]:.0f}% ({100 * g[chosen][1] / roof[1]:.0f}%) |")


if __name__ == "__main__":
    main()
