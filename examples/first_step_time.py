"""Time to the first training step, from an empty kernel cache, in a fresh process: where the seconds go.

    python examples/first_step_time.py                      # mnist_convnet, batch 128, SGD, numba, cold
    python examples/first_step_time.py --warm               # the same twice on one cache: cold, then warm
    python examples/first_step_time.py --model lenet5 --batch 64 --optimizer adam --repeats 3

Each run starts a new Python process with GRAPHC_CACHE_DIR and NUMBA_CACHE_DIR pointed at a new, empty
temporary directory (what `graphc bench` does for its cold probe) and prints, in seconds since the
parent started that process: imports done, model built, compile() done (passes, lowering), the first
step done (binding, kernel discovery, loading and compiling kernels, running), and the second step
done, plus the precompile breakdown and the CPU seconds of the process and its compile workers. Wall times on a shared machine depend on its load (printed).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def child(model, batch, optimizer):
    t_import = time.time()
    import numpy as np

    import graphc as gc
    from graphc.bench import make_feeds
    t_imported = time.time()
    g = gc.models.load(model)
    feeds = make_feeds(g, batch)
    t_built = time.time()
    opt = gc.optim.Adam(1e-3) if optimizer == "adam" else gc.optim.SGD(0.01)
    exe = gc.compile(g, backend="numba", optimizer=opt)
    t_compiled = time.time()
    loss = exe.step(feeds)
    t_step1 = time.time()
    import resource
    cpu_main = time.process_time()
    w = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_workers = w.ru_utime + w.ru_stime
    exe.step(feeds)
    t_step2 = time.time()
    kernels = exe.compile_times["bindings"][0]["kernels"]
    out = {"start": t_import, "imported": t_imported, "built": t_built, "compiled": t_compiled,
           "step1": t_step1, "step2": t_step2, "loss": loss, "kernels": kernels,
           "finite": bool(np.isfinite(loss)), "cpu_main": cpu_main, "cpu_workers": cpu_workers}
    print("FIRST_STEP " + json.dumps(out, default=str))


def run_once(args, cache):
    env = dict(os.environ, GRAPHC_CACHE_DIR=os.path.join(cache, "kernels"), NUMBA_CACHE_DIR=os.path.join(cache, "numba"))
    import resource
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", args.model, str(args.batch), args.optimizer],
                       env=env, capture_output=True, text=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)      # the process and its compile workers
    for line in p.stdout.splitlines():
        if line.startswith("FIRST_STEP "):
            r = json.loads(line[len("FIRST_STEP "):])
            r["cpu"] = cpu
            return {k: (v - t0 if k in ("start", "imported", "built", "compiled", "step1", "step2") else v)
                    for k, v in r.items()}
    sys.exit("the child process failed:\n" + p.stderr[-3000:])


def show(label, r):
    k = r["kernels"] or {}
    print(f"{label}: interpreter up {r['start']:.2f}  imports {r['imported']:.2f}  model {r['built']:.2f}  "
          f"compile() {r['compiled']:.2f}  first step {r['step1']:.2f}  second step {r['step2']:.2f}  "
          f"(s since start; loss {r['loss']:.5f})")
    print(f"    CPU to the first step: {r['cpu_main']:.2f} s in the process, {r['cpu_workers']:.2f} s in its compile "
          f"workers; {r['cpu']:.2f} s in all")
    if k:
        print(f"    kernels {k.get('kernels')}: {k.get('cached')} cached, {k.get('compiled')} compiled in "
              f"{k.get('workers', 0) + 1} process(es); discovery {k.get('discovery_s', 0):.3f} s, "
              f"precompile {k.get('seconds', 0):.2f} s; idle CPUs seen {k.get('idle_cpus')}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist_convnet")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--repeats", type=int, default=1, help="cold runs, each on a new empty cache")
    ap.add_argument("--warm", action="store_true", help="after each cold run, a warm one on its cache")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for _ in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="graphc-first-step-")
        try:
            show("cold", run_once(args, cache))
            if args.warm:
                show("warm", run_once(args, cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
