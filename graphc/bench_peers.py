"""The peers of `graphc bench --compare`, and the peak memory of every step process.

Each peer runs in a process of its own (torch and Numba in one process stall each other's threads,
measured) on the same model, batch, feeds (seed 0) and initial weights:

- "torch" (PyTorch eager) and "torch_compile": the graph translated op by op
  (graphc.bench._torch_forward_factory), plain SGD for a training step; checked: its loss on the feeds,
  without dropout, equals the loss of graphc's reference backend ("same loss").
- "onnxruntime": the model as ONNX (an .onnx MODEL as it is, a zoo model exported with gc.onnx.save)
  on the CPU execution provider with graphc's thread count and one inter-op thread; inference only (the
  onnxruntime package has no training step); checked: its outputs equal those of graphc's reference
  backend (rtol 1e-3, atol 1e-4 x the output's magnitude).
- "jax": reported absent (no graph translation for it yet).
- graphc itself, for memory: a fresh process runs the benchmarked step (kernels from the disk cache).

Side by side: the timed steps of graphc (in the benchmarking process) and of every peer (in its process,
kept waiting between blocks) come in ROUNDS rounds, each one block of steps of each in turn, the order
reversed every other round; each one's step time is the median over all its blocks, and a ratio divides
two medians of the same minutes. (These machines drift between a faster and a slower phase within
minutes, up to 1.6x apart: timed one after the other, graphc in one phase and torch in the next, the same
ResNet-18 batch-1 step gave ratios from 0.85x to 1.57x in one afternoon.) A block whose steps are short
starts with one untimed step: the caches and threads the other process just used.

Memory, in every one of these processes (the peak resident set size: VmHWM on Linux, where ru_maxrss
would report the parent's size in a child; ru_maxrss elsewhere): "rss_peak_mb", the peak after warm-up
(imports, compile and warm-up included), and "rss_step_mb", the peak over the timed steps alone (the
high-water mark reset before them through /proc/self/clear_refs; Linux only).
graphc's memory plan's planned bytes are beside them in the report ("memory plan").

An .onnx MODEL whose weights are ConstantOfShape placeholders (the onnx wheel's light/ models, all
0.02) is benchmarked with seeded random weights in their place (seed 0, or `--random-weights SEED`,
which also replaces the float initializers of every weight slot): a temporary copy every process loads.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from graphc.errors import GraphError

PEERS = {"torch": "torch_eager", "torch_eager": "torch_eager", "torch_compile": "torch_compile",
         "jax": "jax_jit", "jax_jit": "jax_jit", "onnxruntime": "onnxruntime", "ort": "onnxruntime"}
PEER_TIMEOUT = 900
ORT_RTOL, ORT_ATOL = 1e-3, 1e-4          # atol x the output's largest magnitude
TAG = "GRAPHC_PEER "


# ------------------------------------------------------------------------------------------ memory

def maxrss_mb():
    """This process's peak resident set size in MB: VmHWM of /proc/self/status on Linux, else ru_maxrss
    (resource.getrusage(RUSAGE_SELF)). On Linux ru_maxrss is no use in a child: it starts at the size of
    the parent it was forked from (the kernel keeps the pre-exec peak) and clear_refs cannot lower it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6          # kB
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e6 if sys.platform == "darwin" else r * 1024 / 1e6


def reset_peak():
    """Resets the peak RSS to the current RSS (Linux: /proc/self/clear_refs); False where that is not
    possible, so the step peak is reported as unknown rather than wrong."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def repeats_for(seconds_per_step, repeats, budget_s):
    """Timed runs: `repeats`, or fewer when that would take over budget_s (at least 3)."""
    if not budget_s:
        return repeats
    return max(3, min(repeats, int(budget_s / max(seconds_per_step, 1e-6))))


def _warm_up(step, warmup):
    """Runs `step` `warmup` times (at least once); the mean seconds of a step."""
    warm = []
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t0)
    return float(np.mean(warm))


def timed_steps(step, n, settle):
    """Seconds of each of `n` runs of `step`, after one untimed run when `settle`."""
    if settle:
        step()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return ts


SETTLE_BELOW_S = 0.1     # a block of steps shorter than this starts with an untimed one (module doc)
ROUNDS = 5               # side by side: rounds of one block each (module doc)
READY, TIMES, RUN, END = "GRAPHC_PEER_READY ", "GRAPHC_PEER_TIMES ", "run", "end"


def measure(step, repeats, warmup=3, budget_s=None, driven=False):
    """Warm-up, the peak RSS so far, then the timed steps with the peak reset before them:
    {"step_ms" (median), "repeats", "rss_peak_mb", "rss_step_mb" (None where it cannot be reset)}.
    With budget_s the timed steps stop once they have taken that long (after at least 3). `driven`:
    the timed steps come in blocks when the parent asks (side by side, module doc): this process prints
    READY and the mean step seconds, then for each line "run N" on stdin times N steps and prints
    TIMES and their seconds, until "end" (or the end of stdin)."""
    step_s = _warm_up(step, warmup)
    out = {"rss_peak_mb": maxrss_mb()}
    was_reset = reset_peak()
    ts, start = [], time.perf_counter()
    if driven:
        print(READY + json.dumps(step_s), flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] != RUN:
                break
            block = timed_steps(step, int(words[1]), step_s < SETTLE_BELOW_S)
            ts += block
            print(TIMES + json.dumps(block), flush=True)
    else:
        for _ in range(repeats_for(step_s, repeats, budget_s)):
            ts += timed_steps(step, 1, False)
            if budget_s and len(ts) >= 3 and time.perf_counter() - start > budget_s:
                break
    if not ts:
        raise GraphError("no steps were timed (the benchmark ended before its rounds)")
    out.update(step_ms=1e3 * float(np.median(ts)), repeats=len(ts), rss_step_mb=maxrss_mb() if was_reset else None)
    return out


# ------------------------------------------------------------------------------------ the model

class ModelSource:
    """What every process of one benchmark loads: MODEL itself, or a seeded-random-weights copy of an
    .onnx MODEL (see the module doc); `onnx_path(g)` is the model as ONNX for onnxruntime."""

    def __init__(self, model, random_weights=None):
        self.name, self.spec, self.note, self._tmp = model, model, None, None
        is_onnx = isinstance(model, str) and model.lower().endswith(".onnx")
        if random_weights is not None:
            if isinstance(random_weights, bool) or not isinstance(random_weights, (int, np.integer)) \
                    or random_weights < 0:
                raise GraphError(f"--random-weights takes a seed (an integer >= 0), got {random_weights!r}")
            if not is_onnx:
                raise GraphError(f"--random-weights applies to an .onnx MODEL, not {model!r} (the zoo's "
                                 "models start from seeded random weights already)")
        if is_onnx:
            self._randomize(model, random_weights)

    def _randomize(self, path, seed):
        from graphc.onnx.importer import load_file, onnx_module
        from graphc.onnx.random_weights import constant_weights, randomize
        m = load_file(path)
        if seed is None and not constant_weights(m):
            return
        m, count = randomize(m, 0 if seed is None else int(seed), initializers=seed is not None)
        self.spec = os.path.join(self.tmpdir(), os.path.basename(path))
        onnx_module().save(m, self.spec)
        why = "" if seed is not None else " (its weights were constant placeholders)"
        self.note = f"seeded random weights (seed {0 if seed is None else seed}) in {count} tensors{why}"

    def tmpdir(self):
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="graphc-bench-model-")
            atexit.register(shutil.rmtree, self._tmp, True)
        return self._tmp

    def onnx_path(self, g):
        """The model as an ONNX file: an .onnx MODEL's (randomized) file, else `g` exported."""
        if self.spec.lower().endswith(".onnx"):
            return self.spec
        from graphc.onnx.exporter import save
        path = os.path.join(self.tmpdir(), "model.onnx")
        if not os.path.exists(path):
            save(g, path)
        return path

    def close(self):
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# --------------------------------------------------------------------------------- child processes

def child_main(arg):
    """A peer's process: `arg` is the JSON of run_child's spec; prints TAG + the JSON result."""
    a = json.loads(arg)
    try:
        res = CHILDREN[a["peer"]](a)
    except GraphError as e:
        res = {"error": " ".join(str(e).split())}
    print(TAG + json.dumps(res, default=float), flush=True)


def peer_environment():
    """The environment a peer runs in: the user's, without what graphc's numba backend set for itself
    (its GOMP_SPINCOUNT default would also reach torch's OpenMP threads)."""
    env = dict(os.environ)
    threads = sys.modules.get("graphc.backends.numba.threads")
    if threads is not None and threads.SPINCOUNT_DEFAULTED:
        env.pop("GOMP_SPINCOUNT", None)
    return env


def _start_child(spec, **pipes):
    """A peer's process for `spec` (child_main), in its own session, so torch.compile's workers go with
    it when it is killed (_kill_group)."""
    cmd = [sys.executable, "-c", "import sys; from graphc.bench_peers import child_main; child_main(sys.argv[1])",
           json.dumps(spec)]
    return subprocess.Popen(cmd, text=True, start_new_session=True, env=peer_environment(), **pipes)


def _kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        p.kill()


def _over_cap(timeout):
    return {"error": f"over the {timeout:g} s cap (compile included); not timed"}


def _no_result(stderr_text, returncode):
    return {"error": (stderr_text.strip().splitlines() or [f"no output (exit status {returncode})"])[-1]}


def run_child(spec, timeout=PEER_TIMEOUT):
    """Runs one peer process to its end; its result."""
    p = _start_child(spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        p.communicate()
        return _over_cap(timeout)
    for line in stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    return _no_result(stderr, p.returncode)


class PeerProcess:
    """A peer's process timed side by side (module doc): started with the spec's "driven" flag, it
    warms up and waits; `run(n)` times n steps there, `finish()` ends it and returns its result (as
    run_child's). Its whole life, compile and rounds included, is capped at `timeout` seconds."""

    def __init__(self, spec, timeout=PEER_TIMEOUT):
        self.timeout, self.deadline, self.result = timeout, time.monotonic() + timeout, None
        self.stderr = tempfile.TemporaryFile(mode="w+")      # a file: a chatty peer cannot fill a pipe and stall
        self.proc = _start_child(dict(spec, driven=True), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.stderr)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.step_s = self._expect(READY)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _expect(self, prefix):
        """The JSON after `prefix` on the next such line; None once the process has ended (self.result
        says how) or ran past its cap (killed)."""
        while self.result is None:
            try:
                line = self.lines.get(timeout=max(0.0, self.deadline - time.monotonic()))
            except queue.Empty:
                self._kill()
                self.result = _over_cap(self.timeout)
                break
            if line is None:
                self.proc.wait()
                self.stderr.seek(0)
                self.result = _no_result(self.stderr.read(), self.proc.returncode)
            elif line.startswith(TAG):
                self.result = json.loads(line[len(TAG):])
            elif line.startswith(prefix):
                return json.loads(line[len(prefix):])
        return None

    def _send(self, line):
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):        # it has ended: _expect reads why
            pass

    def run(self, n):
        """The seconds of n timed steps in the peer's process; None once it has ended (see finish)."""
        if self.result is not None:
            return None
        self._send(f"{RUN} {int(n)}")
        return self._expect(TIMES)

    def finish(self):
        if self.result is None:
            self._send(END)
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
            self._expect(TAG)
        self._kill()
        self.stderr.close()
        return self.result

    def _kill(self):
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=max(0.0, min(5.0, self.deadline - time.monotonic())))
        if self.proc.poll() is None:
            _kill_group(self.proc)
            self.proc.wait()


def side_by_side(graphc_step, graphc_step_s, peers, repeats, budget_s=None, rounds=None):
    """Times graphc's step (here) and each of `peers` ({key: PeerProcess}) in rounds (module doc):
    {key or "graphc": [[seconds of each timed step] for each block]}. Each gets
    repeats_for(its step, repeats, budget_s) steps in all, split evenly over the rounds (one block a
    round, at least one step); a peer that ends meanwhile leaves the rounds (its result says why)."""
    rounds = rounds or ROUNDS
    runs = {"graphc": lambda n: timed_steps(graphc_step, n, graphc_step_s < SETTLE_BELOW_S)}
    runs.update((k, p.run) for k, p in peers.items())
    steps = {"graphc": graphc_step_s, **{k: p.step_s for k, p in peers.items()}}
    block = {k: max(1, -(-repeats_for(s, repeats, budget_s) // rounds)) for k, s in steps.items()}
    times = {k: [] for k in runs}
    for r in range(rounds):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            got = runs[k](block[k])
            if got is None:
                del runs[k]
            else:
                times[k].append(got)
    return times


def _model_and_feeds(a):
    from graphc.bench import _load, make_feeds
    g = _load(a["model"])
    return g, make_feeds(g, a["batch"])


def _loss_name(g):
    return g.loss or next((o for o in g.outputs if g.nx.nodes[o]["shape"] == ()), g.outputs[0])


def _torch_child(a):
    try:
        import torch
    except ImportError as e:
        return {"absent": f"torch not installed ({e})"}
    from graphc.bench import LR, _torch_forward_factory
    g, feeds_np = _model_and_feeds(a)
    batch, train = a["batch"], a["train"]
    feeds = {k: torch.from_numpy(v) for k, v in feeds_np.items()}
    forward, params = _torch_forward_factory(g, torch, batch)
    loss_name = _loss_name(g)
    opt = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=LR) if train else None
    out = {}
    with torch.no_grad():          # the same model: its loss on these feeds, without dropout
        r0 = forward(feeds, False)
        if loss_name in r0:
            out["loss_eval"] = float(r0[loss_name])
    t0 = time.perf_counter()
    # static shapes: every call has the same ones (automatic dynamic shapes hit an inductor NameError
    # on a recompile of the lenet5 training step, torch 2.13)
    fwd = torch.compile(forward, dynamic=False) if a["peer"] == "torch_compile" else forward
    outs = list(g.outputs)

    def step():
        if train:
            opt.zero_grad(set_to_none=True)
            fwd(feeds, True)[loss_name].backward()
            opt.step()
        else:
            with torch.no_grad():
                r = fwd(feeds, False)
                return [r[o] for o in outs]

    step()
    out["compile_s"] = time.perf_counter() - t0
    out.update(measure(step, a["repeats"], 3, a.get("budget_s"), a.get("driven", False)))
    out["version"], out["threads"] = torch.__version__, torch.get_num_threads()
    if out["threads"] > 1 and a["peer"] == "torch_eager":
        # for context (graphc picks its thread count by measurement): torch on one thread
        from graphc.bench import _median_ms
        torch.set_num_threads(1)
        out["step_ms_1thread"] = _median_ms(step, out["repeats"], 1)
        torch.set_num_threads(out["threads"])
    return out


def _jax_child(a):
    try:
        import jax  # noqa: F401
    except ImportError as e:
        return {"absent": f"jax not installed ({e})"}
    return {"absent": "jax peer not implemented for graph translation"}


def _onnxruntime_child(a):
    from graphc.onnx import peer
    try:
        ort = peer._ort()
    except GraphError as e:
        return {"absent": str(e)}
    data = np.load(a["data"])
    feeds = {n: data[f"f{i}"] for i, n in enumerate(a["feeds"])}
    expect = {n: data[f"e{i}"] for i, n in enumerate(a["expect"])}
    t0 = time.perf_counter()
    sess = peer.session(a["onnx"], a["threads"])
    inputs = peer.session_inputs(sess, feeds)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, inputs)))
    out = {"compile_s": time.perf_counter() - t0, "version": ort.__version__, "threads": a["threads"]}
    checks = [peer.agreement(got[n], expect[n], ORT_RTOL, ORT_ATOL * float(np.max(np.abs(expect[n]), initial=1.0)))
              for n in names if n in expect]
    if checks:
        out["same_outputs"] = all(ok for ok, _ in checks)
        out["max_abs_err"] = max(err for _, err in checks)
    out.update(measure(lambda: sess.run(names, inputs), a["repeats"], 3, a.get("budget_s"), a.get("driven", False)))
    return out


def _graphc_child(a):
    """The benchmarked step in a fresh graphc process (kernels from the disk cache): its memory."""
    from graphc.bench import _compile, _step_fn
    g, feeds = _model_and_feeds(a)
    exe = _compile(g, a["backend"], a["train"], a["fuse"])
    if hasattr(exe, "precompile"):
        exe.precompile(a["batch"], train=a["train"], feeds=feeds)
    return measure(_step_fn(exe, feeds, a["train"]), a["repeats"], 3, a.get("budget_s"))


CHILDREN = {"torch_eager": _torch_child, "torch_compile": _torch_child, "jax_jit": _jax_child,
            "onnxruntime": _onnxruntime_child, "graphc": _graphc_child}


# ------------------------------------------------------------------------------------ the parent

def graphc_threads(exe):
    """The thread count graphc's step runs on (chosen per binding by measurement), for onnxruntime."""
    b = next(iter(getattr(exe, "_bindings", {}).values()), None)
    if b is not None and getattr(b, "threads", None):
        return int(b.threads)
    from graphc.onnx.peer import default_threads
    return default_threads()


def _reference(g, feeds, outs):
    """The loss (None without one) and `outs` from graphc's reference backend: what peers must match."""
    import graphc as gc
    lname = g.loss or next((o for o in g.outputs if g.nx.nodes[o]["shape"] == ()), None)
    want = ([lname] if lname else []) + [o for o in outs if o != lname]
    if not want:
        return None, {}
    got = gc.compile(g, keep=want).run(feeds, outputs=want)
    return (float(got[lname]) if lname else None), {o: np.asarray(got[o]) for o in outs}


def _onnxruntime_spec(src, g, feeds, expect, threads):
    from graphc.onnx.exporter import export_outputs
    path = src.onnx_path(g)
    data = os.path.join(src.tmpdir(), "feeds.npz")
    names = [n for n in feeds]
    outs = [o for o in export_outputs(g) if o in expect]
    np.savez(data, **{f"f{i}": feeds[n] for i, n in enumerate(names)},
             **{f"e{i}": expect[o] for i, o in enumerate(outs)})
    return {"onnx": path, "data": data, "feeds": names, "expect": outs, "threads": threads}


def compare(src, g, exe, feeds, peers, batch, train, repeats, step_fn, budget_s=None, timeout=PEER_TIMEOUT,
            backend="numba", fuse=True):
    """({peer: result}, graphc's own step process {step_ms, rss_*}, graphc's side-by-side timing
    {step_ms, repeats, rounds, block_ms} or None) for `graphc bench --compare`: every peer that can be timed is
    started and warmed up one after another, then all are timed side by side with graphc's `step_fn`
    (module doc); each ratio is graphc's median over the rounds / the peer's."""
    keys = [PEERS.get(c, c) for c in peers]
    outs = []
    if "onnxruntime" in keys and not train:
        from graphc.onnx.exporter import export_outputs
        outs = export_outputs(g)
    ref_loss, expect = _reference(g, feeds, outs)
    base = {"model": src.spec, "batch": batch, "train": train, "repeats": repeats, "budget_s": budget_s}
    results, procs = {}, {}
    try:
        for c, key in zip(peers, keys):
            if key not in CHILDREN or key == "graphc":
                results[c] = {"error": f"unknown peer {c!r}; choose from torch, torch_compile, onnxruntime, jax"}
                continue
            spec = dict(base, peer=key)
            if key == "onnxruntime" and train:
                results[key] = {"skipped": "onnxruntime times inference only (no training step in its CPU package)"}
                continue
            if key == "onnxruntime":
                try:
                    spec.update(_onnxruntime_spec(src, g, feeds, expect, graphc_threads(exe)))
                except GraphError as e:                 # e.g. an op the exporter does not write
                    results[key] = {"error": f"cannot export the model to ONNX: {' '.join(str(e).split())}"}
                    continue
            procs[key] = PeerProcess(spec, timeout)
            results[key] = None
        ready = {k: p for k, p in procs.items() if p.result is None}
        side = None
        if ready:
            step_fn()                           # graphc warm again (the peers' start-up ran meanwhile)
            t0 = time.perf_counter()
            step_fn()
            blocks = side_by_side(step_fn, time.perf_counter() - t0, ready, repeats, budget_s)
            mine = [t for b in blocks["graphc"] for t in b]
            side = {"step_ms": 1e3 * float(np.median(mine)), "repeats": len(mine), "rounds": ROUNDS,
                    "block_ms": {k: [round(1e3 * float(np.median(b)), 4) for b in v] for k, v in blocks.items()}}
        for key, p in procs.items():
            results[key] = p.finish()
    finally:
        for p in procs.values():
            if p.proc.poll() is None:
                p.finish()
    for key, res in results.items():
        if side and "step_ms" in res:
            res["ratio"] = side["step_ms"] / res["step_ms"]       # graphc time / peer time (< 1: graphc faster)
        if "loss_eval" in res and ref_loss is not None:
            res["same_model"] = bool(abs(res["loss_eval"] - ref_loss) <= 1e-3 * max(1.0, abs(ref_loss)))
    own = run_child(dict(base, peer="graphc", backend=backend, fuse=fuse), timeout)
    return results, own, side


# ------------------------------------------------------------------------------------ the report

def _mb(v):
    return f"{v:.0f} MB" if isinstance(v, (int, float)) else "n/a"


def _peer_line(peer, res, step_ms):
    if "step_ms" not in res:
        return f"{peer}: {res.get('absent') or res.get('skipped') or res.get('error')}"
    same = {True: ", same loss as graphc", False: ", LOSS DIFFERS from graphc"}.get(res.get("same_model"), "")
    if "same_outputs" in res:
        same += (", same outputs as graphc" if res["same_outputs"] else ", OUTPUTS DIFFER from graphc") \
            + f" (max abs err {res['max_abs_err']:.3g})"
    n = res.get("threads")
    what = ("torch" if peer.startswith("torch") else peer) + f" {res.get('version')}, {n} thread{'' if n == 1 else 's'}"
    line = f"{peer}: {res['step_ms']:.3f} ms  -> graphc/peer = {res['ratio']:.2f}x{same}  ({what})"
    if res.get("step_ms_1thread"):
        line += (f"\n{peer} on 1 thread: {res['step_ms_1thread']:.3f} ms  -> graphc/peer = "
                 f"{step_ms / res['step_ms_1thread']:.2f}x")
    return line


def report_lines(r):
    """The report's lines for the weights note, the peers and every process's peak memory."""
    lines = [f"weights: {r['weights']}"] if r.get("weights") else []
    lines += [_peer_line(p, res, r["step_ms"]) for p, res in r.get("compare", {}).items()]
    own = r.get("graphc_process")
    if own and "error" in own:
        lines.append(f"graphc step process: {own['error']}")
    elif own:
        procs = [("graphc", own)] + [(p, res) for p, res in r["compare"].items() if "rss_peak_mb" in res]
        lines.append("peak RSS over the timed steps (since the process started): " + "; ".join(
            f"{p} {_mb(res.get('rss_step_mb'))} ({_mb(res.get('rss_peak_mb'))})" for p, res in procs))
    return lines
