"""Compiled-kernel benchmarking: `run_bench(model, ...)` (what `graphc bench MODEL` calls).

What it measures, for a zoo model (graphc.models.<name>()) or "path/file.py:function":

- the whole step (inference run, or training step = forward + backward + update), median of `repeats`
  after warm-up; with peers, timed side by side with theirs (blocks in turn over the same minutes:
  bench_peers' module doc);
- a per-kernel table from the executable's profiling run (every kernel call timed on its own): name,
  the ops fused into it, shapes, median ms, GFLOP/s, share of the step;
- compile time, cold (a fresh process with empty kernel caches: GRAPHC_CACHE_DIR and NUMBA_CACHE_DIR
  pointed at a new temporary directory) and warm (a second fresh process on the caches the first one
  filled): compile() plus binding and compiling/loading every kernel for the batch size (the first
  step), with the process's CPU seconds and the seconds since it started; on the numba backend the
  cold one broken down (backends/numba/compile_stats.py): kernels compiled and in which processes,
  typing and LLVM seconds, per kind of kernel, the slowest kernels, conv strategy and thread timing;
- the roofline: numpy's SGEMM GFLOP/s measured here (1024^2 float32 matmul) and the memory bandwidth (a
  64 MB numpy copy, bytes read + written per second); each kernel's GB/s (its inputs and output read or
  written once) and each conv kernel's fraction of the roofline: of SGEMM where its flops per byte
  make it compute-bound, of the copy bandwidth where they make it memory-bound (depthwise convs);
- peers (`compare`): "torch" (PyTorch eager), "torch_compile", "onnxruntime", "jax", each in a SEPARATE
  process, on the same model, batch, feeds and initial weights, checked to agree with graphc, with the
  peak memory (RSS) of every step process, graphc's own included (graphc/bench_peers.py). A peer that
  is not installed is reported as absent, never fatal.

Returns a dict (also written to json_path) with at least: model, backend, batch, mode, step_ms,
compile_s {cold, warm}, roofline_gflops, kernels [{name, ops, ms, gflops}], compare {peer: {step_ms,
rss_peak_mb, rss_step_mb, ratio}}, graphc_process {step_ms, rss_peak_mb, rss_step_mb} and side_by_side
{step_ms, repeats, rounds, block_ms} (with compare; None when no peer could be timed).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import networkx as nx
import numpy as np

DEFAULT_BATCH = 64
LR = 0.01


# ------------------------------------------------------------------------------------------ helpers

def _load(model):
    from graphc import models
    return models.load(model)


def _num_classes(g):
    for n in g.nx.nodes:
        d = g.nx.nodes[n]
        if d["op"] in ("softmax_cross_entropy", "cross_entropy"):
            return int(g.nx.nodes[d["inputs"][0]]["shape"][-1])
    return 2


def make_feeds(g, batch, seed=0):
    rng = np.random.default_rng(seed)
    k = _num_classes(g)
    feeds = {}
    for name in g.inputs:
        shape, dt = g.nx.nodes[name]["shape"], g.nx.nodes[name]["dtype"]
        s = tuple(batch if isinstance(d, str) else d for d in shape)
        if dt.startswith("int"):
            feeds[name] = rng.integers(0, k, s).astype(dt)
        else:
            feeds[name] = rng.standard_normal(s).astype(np.float32)
    return feeds


def _median_ms(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def sgemm_gflops(n=1024, repeats=5):
    """numpy (BLAS) float32 matmul GFLOP/s at n x n, all BLAS threads: the roofline."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    ms = _median_ms(lambda: np.matmul(a, b, out=c), repeats, 1)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e9


def copy_gbps(mbytes=64, repeats=5):
    """Memory bandwidth: a numpy copy of `mbytes` MB (read + written bytes per second, best of repeats)."""
    a = np.ones(mbytes * (1 << 20) // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_median_ms(lambda: np.copyto(b, a), 1, 0) for _ in range(repeats))
    return 2.0 * a.nbytes / (best * 1e-3) / 1e9


def roofline_share(flops, nbytes, ms, sgemm, bw):
    """(fraction, "sgemm" or "memory"): a kernel's share of the roofline. Below the ridge point (flops per
    byte < SGEMM GFLOP/s / copy GB/s) it is bound by memory, and measured against the copy bandwidth
    (GB/s of its inputs and output); above, against SGEMM (GFLOP/s)."""
    secs = ms * 1e-3
    if bw and flops * bw < nbytes * sgemm:
        return nbytes / secs / 1e9 / bw, "memory"
    return flops / secs / 1e9 / sgemm, "sgemm"


def _compile(g, backend, train, fuse, fold_bn=True):
    import graphc as gc
    opt = gc.optim.SGD(LR) if train else None
    flags = {} if fold_bn else {"fold_bn": False}      # (the pipeline's default: on for numba and cuda)
    return gc.compile(g, backend=backend, optimizer=opt, fuse=fuse, **flags)


def _step_fn(exe, feeds, train):
    return (lambda: exe.step(feeds)) if train else (lambda: exe.run(feeds))


# ------------------------------------------------------------------------ compile time (subprocess)

def _probe_main(argv):
    """Child process: compile + bind/compile every kernel for one batch; prints JSON timings (and, on the
    numba backend, where the compile went: backends/numba/compile_stats.py)."""
    model, backend, batch, train, fuse = argv[0], argv[1], int(argv[2]), argv[3] == "1", argv[4] == "1"
    fold_bn = argv[5] == "1" if len(argv) > 5 else True
    spawned = float(argv[6]) if len(argv) > 6 else None
    import graphc  # noqa: F401   (imports are not compile time)
    import numba  # noqa: F401
    rec = None
    if backend == "numba":
        from graphc.backends.numba.compile_stats import CompileRecorder
        rec = CompileRecorder().start()
    g = _load(model)
    feeds = make_feeds(g, batch)
    t0, c0 = time.perf_counter(), time.process_time()
    exe = _compile(g, backend, train, fuse, fold_bn)
    t1 = time.perf_counter()
    if hasattr(exe, "precompile"):
        exe.precompile(batch, train=train, feeds=feeds)
    else:
        _step_fn(exe, feeds, train)()
    t2 = time.perf_counter()
    out = {"compile_s": t1 - t0, "first_step_s": t2 - t1, "total_s": t2 - t0, "cpu_s": time.process_time() - c0}
    if spawned is not None:
        out["since_start_s"] = time.time() - spawned     # interpreter start and imports included
    if rec is not None:
        out["breakdown"] = rec.stop().breakdown()
        out["breakdown"]["bindings"] = exe.compile_times["bindings"]
    print("GRAPHC_PROBE " + json.dumps(out, default=str))


def _run_probe(model, backend, batch, train, fuse, env, timeout=900, fold_bn=True):
    cmd = [sys.executable, "-c", "import sys; from graphc.bench import _probe_main; _probe_main(sys.argv[1:])",
           model, backend, str(batch), "1" if train else "0", "1" if fuse else "0", "1" if fold_bn else "0",
           repr(time.time())]
    import resource
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for line in p.stdout.splitlines():
        if line.startswith("GRAPHC_PROBE "):
            out = json.loads(line[len("GRAPHC_PROBE "):])
            # the whole child's CPU (interpreter start, imports, compile workers): wall time on a busy
            # machine is not the compiler's alone
            out["process_cpu_s"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            if hasattr(os, "getloadavg"):
                out["loadavg"] = os.getloadavg()
            return out, None
    return None, (p.stderr.strip().splitlines() or ["no output"])[-1]


def compile_times(model, backend, batch, train, fuse, fold_bn=True, timeout=900):
    """{"cold": s, "warm": s} from two fresh processes sharing one new, initially empty cache dir."""
    tmp = tempfile.mkdtemp(prefix="graphc-bench-cache-")
    env = dict(os.environ, GRAPHC_CACHE_DIR=os.path.join(tmp, "kernels"), NUMBA_CACHE_DIR=os.path.join(tmp, "numba"))
    try:
        cold, err = _run_probe(model, backend, batch, train, fuse, env, timeout=timeout, fold_bn=fold_bn)
        warm, err2 = (_run_probe(model, backend, batch, train, fuse, env, timeout=timeout, fold_bn=fold_bn) if cold else (None, err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"cold": cold["total_s"] if cold else None, "warm": warm["total_s"] if warm else None}
    if cold:
        out["cold_detail"] = cold
    if warm:
        out["warm_detail"] = warm
    if err or err2:
        out["error"] = err or err2
    return out


# ------------------------------------------------------------------------------------ peers (torch)

class _TorchCtx:
    """What an op's torch field may read (graphc.ops.OpDef.torch): training, and resolve(shape) with the
    batch dim bound."""

    def __init__(self, batch, training):
        self.batch, self.training = batch, training

    def resolve(self, shape):
        return tuple(self.batch if isinstance(s, str) else s for s in shape)


def _torch_idioms(g, order):
    """The two patterns torch users would write: dense = F.linear (matmul(x, w^T) + b) and dropout =
    F.dropout (x * dropout_mask(x)). Returns ({add: (x, w, b)}, {mul: (x, rate)}, nodes they absorb)."""
    nodes = g.nx.nodes
    users = {n: list(g.nx.successors(n)) for n in order}
    linear_of, dropout_of, skip = {}, {}, set()
    for n in order:
        d = nodes[n]
        if d["op"] == "mul":
            a, b = d["inputs"]
            for x, m in ((a, b), (b, a)):
                dm = nodes[m]
                if dm["op"] == "dropout_mask" and dm["inputs"][0] == x and users[m] == [n]:
                    dropout_of[n] = (x, dm["attrs"]["rate"])
                    skip.add(m)
        elif d["op"] == "add":
            a, b = d["inputs"]
            da = nodes[a]
            if (da["op"] == "matmul" and da["attrs"].get("trans_b") and not da["attrs"].get("trans_a")
                    and len(nodes[b]["shape"]) == 1 and users[a] == [n]):
                linear_of[n] = (da["inputs"][0], da["inputs"][1], b)
                skip.add(a)
    return linear_of, dropout_of, skip


def _last_uses(program, keep):
    """Per step of the program, the values no later step reads (and not in `keep`)."""
    last = {}
    for i, (n, how, ins, _) in enumerate(program):
        reads = () if how == "source" else ins[:1] if how == "dropout" else ins
        for x in (*reads, n):
            last[x] = i
    frees = [[] for _ in program]
    for x, i in last.items():
        if x not in keep:
            frees[i].append(x)
    return frees


def _torch_forward_factory(g, torch, batch):
    """The graph translated op by op into torch calls (forward only; autograd gives the backward): each
    op by its op-table ``torch`` field, dense layers and dropout by their torch idioms. Returns
    (forward(feeds, training) -> {output or loss name: tensor}, {state name: tensor})."""
    from graphc import ops as optable
    F = torch.nn.functional
    nodes = g.nx.nodes
    needed = set(g.outputs) | ({g.loss} if g.loss else set())
    for o in list(needed):
        needed |= nx.ancestors(g.nx, o)
    order = [n for n in g.topo() if n in needed]      # (not the running-stat updates: F.batch_norm makes them)
    params = {}
    for n in g.state_names:
        params[n] = torch.tensor(np.asarray(g.params[n], np.float32),
                                 requires_grad=bool(nodes[n]["attrs"].get("trainable", True)))
    fixed = dict(params)
    for n in order:
        d = nodes[n]
        if optable.OPS[d["op"]].source and "value" in d["attrs"]:
            val = np.asarray(d["attrs"]["value"])
            fixed[n] = torch.tensor(val.astype(np.float32 if val.dtype.kind == "f" else np.int64))
    linear_of, dropout_of, skip = _torch_idioms(g, order)
    # the program as plain tuples: torch.compile cannot trace into networkx (a graph break per op)
    program = []
    for n in order:
        d = nodes[n]
        opdef = optable.OPS[d["op"]]
        if n in skip:
            continue
        if opdef.source:
            program.append((n, "source", None, None))
        elif n in linear_of:
            program.append((n, "linear", linear_of[n], None))
        elif n in dropout_of:
            program.append((n, "dropout", dropout_of[n], None))
        elif opdef.torch is not None:
            program.append((n, opdef.torch, tuple(d["inputs"]), d["attrs"]))
        else:
            raise NotImplementedError(f"torch peer: op {d['op']!r} has no torch equivalent (OpDef.torch)")

    want = list(dict.fromkeys(list(g.outputs) + ([g.loss] if g.loss else [])))
    frees = _last_uses(program, want)

    def forward(feeds, training=True):
        """{output: tensor}; each value is dropped after its last use, as a torch model's would be."""
        ctx = _TorchCtx(batch, training)
        v = {}
        for (n, how, ins, attrs), dead in zip(program, frees):
            if how == "source":
                v[n] = feeds[n] if n in feeds else fixed[n]
            elif how == "linear":
                v[n] = F.linear(v[ins[0]], v[ins[1]], v[ins[2]])
            elif how == "dropout":
                v[n] = F.dropout(v[ins[0]], ins[1], training=training)
            else:
                v[n] = how(F, torch, [v[i] for i in ins], attrs, ctx)
            for x in dead:
                del v[x]
        return {o: v[o] for o in want}

    return forward, params


# ------------------------------------------------------------------------------------ the benchmark

def _fmt_shapes(sh):
    ins = ",".join("x".join(str(d) for d in s) or "()" for s in sh["in"])
    return f"{ins} -> {'x'.join(str(d) for d in sh['out']) or '()'}"


def _profile_generic(exe, feeds, train, repeats):
    """Per-node timing for executables without a profile() (the reference backend)."""
    from graphc import ops as optable
    from graphc import shapes
    from graphc.executable import RunContext
    g = exe.graph
    feeds_c, env = exe.check_feeds(feeds)
    want = ([g.loss] + list(g.updates.values())) if train else list(exe.outputs)
    sched = exe._needed(want) if hasattr(exe, "_needed") else exe.schedule
    times = {}
    for _ in range(repeats):
        ctx = RunContext(env, train, 0)
        vals = {}
        for n in sched:
            d = g.nx.nodes[n]
            if d["op"] == "input":
                vals[n] = feeds_c[n]
                continue
            if d["op"] == "param":
                vals[n] = exe.state[n]
                continue
            if d["op"] == "const":
                vals[n] = exe.consts[n]
                continue
            ctx.out_shape = shapes.resolve(d["shape"], env)
            t0 = time.perf_counter()
            vals[n] = optable.OPS[d["op"]].ref([vals[i] for i in d["inputs"]], d["attrs"], ctx)
            times.setdefault(n, []).append(time.perf_counter() - t0)
    rows = []
    for n in sched:
        if n not in times:
            continue
        d = g.nx.nodes[n]
        ins = [shapes.resolve(g.nx.nodes[i]["shape"], env) for i in d["inputs"]]
        out = shapes.resolve(d["shape"], env)
        fl = optable.OPS[d["op"]].flops
        try:
            flops = int(fl(ins, out, d["attrs"])) if fl else 0
        except Exception:
            flops = 0
        ops = [b["op"] for b in d["attrs"]["body"]] if d["op"] == "fused" else [d["op"]]
        kind = d["attrs"]["pattern"] if d["op"] == "fused" else d["op"]
        rows.append({"name": n, "kind": kind, "ops": ops, "shapes": {"in": ins, "out": out}, "flops": flops,
                     "ms": 1e3 * float(np.median(times[n])), "fallback": False})
    return rows


def _kernel_rows(rows, itemsize, step_ms, roof, bw):
    """The report's kernel table from the profiling rows: GFLOP/s, GB/s, share of the step, roofline."""
    kernels = []
    for r in rows:
        gfl = (r["flops"] / (r["ms"] * 1e-3) / 1e9) if r["ms"] > 0 and r["flops"] else 0.0
        nbytes = itemsize * sum(int(np.prod(s)) for s in list(r["shapes"]["in"]) + [r["shapes"]["out"]])
        k = {"name": r["name"], "kind": r["kind"], "ops": r["ops"], "shapes": _fmt_shapes(r["shapes"]),
             "ms": r["ms"], "gflops": gfl, "gbps": nbytes / (r["ms"] * 1e-3) / 1e9 if r["ms"] > 0 else 0.0,
             "share": r["ms"] / step_ms if step_ms else 0.0,
             "fallback": r.get("fallback", False), "kernel": r.get("kernel")}   # kind, kernel: the backend's registry
        if roof and "conv" in r["kind"] and r["ms"] > 0:
            k["roofline_fraction"], k["roofline"] = roofline_share(r["flops"], nbytes, r["ms"], roof, bw)
        kernels.append(k)
    return kernels


def run_bench(model, backend="numba", batch=None, train=False, fuse=True, compare=(), repeats=None,
              json_path=None, warmup=3, measure_compile=True, roofline=True, out=None, quiet=False,
              random_weights=None, budget_s=None, timeout=900, fold_bn=True, tune=False):
    """Benchmarks `model` (zoo name, "path/file.py:function" or "model.onnx") on `backend`; prints a
    report and returns (and optionally writes to json_path) the results dict described in the module doc.
    random_weights: a seed for an .onnx MODEL's weights (graphc/bench_peers.py); budget_s: cap each
    timing at about that many seconds (fewer repeats for slow steps); timeout: per child process; tune: the
    numba conv strategies of shapes never timed are timed (and remembered) first."""
    if tune and backend == "numba":
        from graphc.backends.numba.conv.strategy import tuning
        with tuning():
            return run_bench(model, backend, batch, train, fuse, compare, repeats, json_path, warmup,
                             measure_compile, roofline, out, quiet, random_weights, budget_s, timeout, fold_bn)
    from graphc import bench_peers
    from graphc.errors import GraphError
    from graphc.files import check_writable
    out = out or sys.stdout
    if batch is None:
        batch = DEFAULT_BATCH
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise GraphError(f"batch must be a positive integer, got {batch!r}")
    batch = int(batch)
    if json_path:
        json_path = check_writable(json_path, "benchmark JSON")     # before the benchmark, not after
    compare = [c for c in (compare or ()) if c]
    repeats = int(repeats or (20 if batch >= 16 else 100))
    mode = "train" if train else "infer"
    if backend == "cuda":
        _require_gpu()
    src = bench_peers.ModelSource(model, random_weights)
    g = _load(src.spec)
    if train and not any(g.nx.nodes[o]["shape"] == () for o in g.outputs):
        from graphc.errors import GraphError
        raise GraphError(f"model {model!r} has no scalar loss output to train")
    feeds = make_feeds(g, batch)

    t0 = time.perf_counter()
    exe = _compile(g, backend, train, fuse, fold_bn)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if hasattr(exe, "precompile"):
        exe.precompile(batch, train=train, feeds=feeds)
    first_s = time.perf_counter() - t0
    if budget_s:                                   # repeats adapt to the step time
        t0 = time.perf_counter()
        _step_fn(exe, feeds, train)()
        repeats = bench_peers.repeats_for(time.perf_counter() - t0, repeats, budget_s)
    # with peers, graphc's step is timed side by side with theirs (bench_peers' module doc), else alone
    peers, own, side = bench_peers.compare(src, g, exe, feeds, compare, batch, train, repeats,
                                           _step_fn(exe, feeds, train), budget_s, timeout, backend,
                                           fuse) if compare else ({}, None, None)
    step_ms = side["step_ms"] if side else _median_ms(_step_fn(exe, feeds, train), repeats, warmup)
    if hasattr(exe, "profile"):
        rows = exe.profile(feeds, train=train, repeats=max(5, repeats // 2), warmup=1)
    else:
        rows = _profile_generic(exe, feeds, train, max(3, min(repeats, 10)))
    roof = sgemm_gflops() if roofline else None
    bw = copy_gbps() if roofline else None
    kernels = _kernel_rows(rows, exe.dtype.itemsize, step_ms, roof, bw)
    ctimes = (compile_times(src.spec, backend, batch, train, fuse, fold_bn, timeout) if measure_compile
              else {"cold": None, "warm": None})
    ctimes["this_process"] = {"compile_s": lower_s, "first_step_s": first_s}
    result = {
        "model": model, "backend": backend, "batch": batch, "mode": mode, "fuse": bool(fuse),
        "fold_bn": sorted(exe.folded_bn()) if hasattr(exe, "folded_bn") else [],
        "step_ms": step_ms, "compile_s": ctimes, "roofline_gflops": roof, "bandwidth_gbps": bw,
        "kernels": kernels, "kernel_count": len(kernels), "kernel_ms_sum": sum(k["ms"] for k in kernels),
        "compare": peers, "graphc_process": own, "side_by_side": side, "weights": src.note,
        "repeats": side["repeats"] if side else repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": f"graphc bench {model} --backend {backend} --batch {batch}" + (" --train" if train else "")
                   + ("" if fuse else " --no-fuse") + ("" if fold_bn else " --no-fold-bn") + (f" --compare {','.join(compare)}" if compare else "")
                   + (f" --random-weights {random_weights}" if random_weights is not None else ""),
    }
    if hasattr(exe, "conv_module"):
        result["conv_kernels"] = exe.conv_module
    b = next(iter(getattr(exe, "_bindings", {}).values()), None)
    if b is not None:
        result["threads"] = {"used": getattr(b, "threads", None),
                             "measured_ms": getattr(b, "thread_times", None)}
    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg"] = os.getloadavg()
    plan = getattr(exe.graph, "memory_plan", None)
    if plan is not None:
        result["memory"] = plan.stats({"N": batch}, exe.dtype.itemsize)
    if not quiet:
        print(report(result), file=out)
    if json_path:
        from graphc.files import atomic_write
        atomic_write(json_path, lambda f: json.dump(result, f, indent=1, default=str), "benchmark JSON", binary=False)
    src.close()
    return result


def compile_lines(c):
    """The report's compile-time lines: cold and warm, and where the cold compile went."""
    lines = []
    fmt = (lambda v: f"{v:.2f} s" if isinstance(v, (int, float)) else "n/a")
    here = c.get("this_process")
    lines.append(f"compile: cold {fmt(c.get('cold'))}, warm {fmt(c.get('warm'))} (fresh processes"
                 + (f"; this process: compile {here['compile_s']:.2f} s + first step {here['first_step_s']:.2f} s"
                    if here else "") + ")" + (f"  [{c['error']}]" if c.get("error") else ""))
    for which in ("cold", "warm"):
        d = c.get(which + "_detail") or {}
        if "cpu_s" in d:
            lines.append(f"  {which}: compile() {d['compile_s']:.2f} s + first step {d['first_step_s']:.2f} s; "
                         f"{d['cpu_s']:.2f} s CPU in the process, {d.get('process_cpu_s', 0):.2f} s with start-up "
                         f"and workers" + (f"; {d['since_start_s']:.2f} s since the process started" if
                                           "since_start_s" in d else "")
                         + (f"; load average {d['loadavg'][0]:.2f}" if d.get("loadavg") else ""))
        for bnd in (d.get("breakdown") or {}).get("bindings", []):
            k = bnd.get("kernels") or {}
            if k:
                lines.append(f"    precompile: {k['kernels']} kernels found, {k['cached']} from the disk cache, "
                             f"{k['compiled']} compiled in {k['workers'] + 1} process(es) (idle CPUs "
                             f"{k.get('idle_cpus')}); discovery {k.get('discovery_s', 0):.3f} s, "
                             f"{k.get('seconds', 0):.2f} s in all")
        if which == "cold" and d.get("breakdown"):
            from graphc.backends.numba.compile_stats import format_breakdown
            lines += format_breakdown(d["breakdown"], "    ")
    return lines


def report(r):
    lines = [f"graphc bench {r['model']}  backend={r['backend']}  batch={r['batch']}  mode={r['mode']}  "
             f"fuse={'on' if r['fuse'] else 'off'}  batch norms folded into convs: {len(r.get('fold_bn', ()))}"]
    lines.append(f"{'kernel':34s} {'ops':34s} {'shapes':38s} {'ms':>8s} {'GFLOP/s':>8s} {'GB/s':>7s} {'share':>6s}")
    for k in r["kernels"]:
        ops = "+".join(k["ops"])
        extra = ""
        if "roofline_fraction" in k:
            of = "memory bandwidth" if k.get("roofline") == "memory" else "SGEMM"
            extra = f"  {100 * k['roofline_fraction']:.0f}% of {of}"
        if k.get("fallback"):
            extra += "  (fallback)"
        lines.append(f"{k['name'][:34]:34s} {ops[:34]:34s} {k['shapes'][:38]:38s} {k['ms']:8.3f} "
                     f"{k['gflops']:8.1f} {k.get('gbps', 0.0):7.1f} {100 * k['share']:5.1f}%{extra}")
    side = r.get("side_by_side")
    lines.append(f"{r['kernel_count']} kernels, {r['kernel_ms_sum']:.3f} ms summed; whole step median "
                 f"{r['step_ms']:.3f} ms" + (f" (side by side with the peers: {side['repeats']} steps in "
                                             f"{side['rounds']} rounds)" if side else ""))
    lines += compile_lines(r["compile_s"])
    if r.get("roofline_gflops"):
        lines.append(f"roofline: numpy SGEMM {r['roofline_gflops']:.1f} GFLOP/s"
                     + (f", memory bandwidth {r['bandwidth_gbps']:.1f} GB/s (numpy copy: bytes read + written)"
                        if r.get("bandwidth_gbps") else ""))
    if r.get("threads"):
        t = r["threads"]
        measured = ", ".join(f"{n} thread{'s' if int(n) != 1 else ''} {ms:.2f} ms"
                             for n, ms in sorted((t.get("measured_ms") or {}).items(), key=lambda kv: -int(kv[0])))
        load = r["machine"].get("loadavg")
        lines.append(f"threads: {t['used']}" + (f" (measured per run: {measured})" if measured else "")
                     + (f"; load average {' '.join(f'{v:.2f}' for v in load)}" if load else ""))
    if r.get("memory"):
        m = r["memory"]
        lines.append(f"memory plan: {m['values']} buffered values in {m['slots']} slots, "
                     f"{m['planned'] / 1e6:.1f} MB planned vs {m['unplanned'] / 1e6:.1f} MB unplanned, "
                     f"{m['inplace_updates']} in-place updates")
    from graphc.bench_peers import report_lines
    lines += report_lines(r)
    return "\n".join(lines)


def _require_gpu():
    """backend="cuda" is benchmarked on a real GPU only: a one-line BackendError saying why not (no GPU or
    driver, with the fix; or the CUDA simulator, whose timings mean nothing)."""
    from graphc.backends.cuda import kernels as ck
    from graphc.errors import BackendError
    ok, why = ck.cuda_status()
    if not ok:
        raise BackendError("graphc bench --backend cuda needs an NVIDIA GPU with a CUDA driver (and "
                           f"pip install 'graphc[cuda]'); here: {why.split(';')[0]}")
    if ck.is_simulator():
        raise BackendError("graphc bench --backend cuda times a real GPU, but the CUDA simulator is on "
                           "(NUMBA_ENABLE_CUDASIM=1): its timings mean nothing; unset it on a machine with a GPU")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m graphc.bench")
    p.add_argument("model")
    p.add_argument("--backend", default="numba")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--train", action="store_true")
    p.add_argument("--no-fuse", action="store_true")
    p.add_argument("--no-fold-bn", action="store_true")
    p.add_argument("--compare", default="")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-compile-times", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--tune", action="store_true")
    a = p.parse_args(argv)
    from graphc.errors import GraphError
    try:
        run_bench(a.model, backend=a.backend, batch=a.batch, train=a.train, fuse=not a.no_fuse, fold_bn=not a.no_fold_bn,
                  compare=[c for c in a.compare.split(",") if c], repeats=a.repeats, json_path=a.json,
                  measure_compile=not a.no_compile_times, tune=a.tune)
    except GraphError as e:                      # BackendError among them: one line, no traceback
        print(f"graphc bench: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
