"""`graphc bench --suite`: the fixed benchmark table behind the README's "Speed" section.

Every entry is one `graphc bench` run (graphc/bench.py) with torch eager, torch.compile and onnxruntime
timed in the same run, each in its own process and side by side with graphc (blocks of steps in turn
over the same minutes, graphc/bench_peers.py), plus graphc's cold/warm compile times and the peak memory
(RSS) of every step process:

    graphc bench --suite --json suite.json                      # all entries; the markdown table at the end
    graphc bench --suite --only resnet18-train-b16,vgg16-infer-b2
    graphc bench --table suite.json                             # the markdown table of a saved run

Each entry's time is bounded: timed runs stop at about `budget_s` seconds per measurement (fewer repeats
for slow steps, at least 3), and every child process (a peer, a compile probe) is capped at `timeout`
seconds: torch.compile may compile for minutes; over the cap it is reported as such, not timed. The JSON
is rewritten after every entry, so a long run keeps what it measured.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

from graphc.errors import GraphError


@dataclass(frozen=True)
class Entry:
    name: str
    model: str
    batch: int
    train: bool

    @property
    def command(self):
        return f"graphc bench {self.model} --batch {self.batch}" + (" --train" if self.train else "")


SUITE = (
    Entry("mnist_convnet-train-b128", "mnist_convnet", 128, True),
    Entry("mnist_convnet-infer-b1", "mnist_convnet", 1, False),
    Entry("lenet5-train-b64", "lenet5", 64, True),
    Entry("alexnet-infer-b8", "alexnet", 8, False),
    Entry("vgg16-infer-b2", "vgg16", 2, False),
    Entry("resnet18-train-b16", "resnet18", 16, True),       # the zoo's resnet18 and mobilenet_v2 are 224x224
    Entry("resnet18-infer-b1", "resnet18", 1, False),
    Entry("mobilenet_v2-infer-b1", "mobilenet_v2", 1, False),
)
PEERS = ("torch", "torch_compile", "onnxruntime")
BUDGET_S = 10.0          # per timing (graphc, each peer)
MAX_REPEATS = 50
TIMEOUT = 600            # per child process


def select(table, only=None):
    """The entries named in `only` (a list or a comma-separated string), in the table's order."""
    if not only:
        return list(table)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    known = {e.name for e in table}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GraphError(f"--only: no suite entry {', '.join(map(repr, unknown))}; the entries are "
                         f"{', '.join(e.name for e in table)}")
    return [e for e in table if e.name in names]


# ----------------------------------------------------------------------------------------- machine

def _cpu_model():
    """(the CPU's model name as lscpu shows it (/proc/cpuinfo), the CPU name Numba's LLVM targets)."""
    model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    try:
        import llvmlite.binding as llvm
        llvm_name = llvm.get_host_cpu_name()
    except Exception:   # noqa: BLE001 - only a label
        llvm_name = None
    return model, llvm_name


def _versions():
    import importlib.metadata as md
    out = {}
    for pkg in ("numpy", "numba", "torch", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        p = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def blas_kernels():
    """"SciPy's OpenBLAS 0.3.30 SkylakeX, numpy's 0.3.31 SkylakeX": the kernel sets of the BLAS libraries graphc's
    numba backend calls (SciPy's for im2col's GEMMs, numpy's for matmul), as loaded by this process with its
    environment. They matter: $OPENBLAS_CORETYPE=Haswell (set on some machines for old OpenBLAS builds) runs
    AVX2 kernels on AVX-512 CPUs, one-thread SGEMM 115-133 GFLOP/s against 193-242 on an AMD EPYC (Zen 5)."""
    try:
        from graphc.backends.kernel_cache import load_scipy_blas_single_threaded
        from threadpoolctl import threadpool_info
        load_scipy_blas_single_threaded()       # as the numba backend does before Numba needs it
        libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception:   # noqa: BLE001 - only a label
        return None
    parts = []
    for i in libs:
        path = i.get("filepath") or ""
        who = "SciPy's" if "scipy.libs" in path or "scipy/" in path else "numpy's" if "numpy" in path else path
        parts.append(f"{who} {i.get('internal_api', '')} {i.get('version') or ''} {i.get('architecture') or ''}".strip())
    return ", ".join(parts) or None


def machine():
    model, llvm_name = _cpu_model()
    return {"cpus": os.cpu_count(), "cpu_model": model, "cpu_llvm": llvm_name, "blas": blas_kernels(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "platform": platform.platform(),
            "python": platform.python_version(), "versions": _versions(), "graphc_commit": _commit(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _load():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ------------------------------------------------------------------------------------------- a run

def summarize(entry, r, wall_s):
    """One entry's record: what the table shows, and the full `graphc bench` result under "detail"."""
    rec = {"name": entry.name, "model": entry.model, "batch": entry.batch, "mode": "train" if entry.train else "infer",
           "command": entry.command, "wall_s": wall_s}
    if "error" in r:
        return dict(rec, error=r["error"])
    c, own, mem = r["compile_s"], r.get("graphc_process") or {}, r.get("memory") or {}
    rec["graphc"] = {"step_ms": r["step_ms"], "repeats": r.get("repeats"), "compile_cold_s": c.get("cold"),
                     "compile_warm_s": c.get("warm"), "rss_step_mb": own.get("rss_step_mb"),
                     "rss_peak_mb": own.get("rss_peak_mb"), "planned_mb": mem["planned"] / 1e6 if "planned" in mem else None,
                     "threads": (r.get("threads") or {}).get("used")}
    peers = {}
    for p, res in r["compare"].items():
        agree = res.get("same_model", res.get("same_outputs"))
        peers[p] = {k: res.get(k) for k in ("step_ms", "ratio", "compile_s", "rss_step_mb", "rss_peak_mb", "repeats",
                                             "threads", "step_ms_1thread", "max_abs_err") if res.get(k) is not None}
        peers[p]["agrees"] = agree
        note = res.get("error") or res.get("absent") or res.get("skipped")
        if note:
            peers[p]["note"] = note
    rec["peers"], rec["loadavg"], rec["detail"] = peers, r["machine"].get("loadavg"), r
    return rec


def entry_line(rec):
    if "error" in rec:
        return f"{rec['name']}: error: {rec['error']}"
    g = rec["graphc"]
    parts = [f"graphc {g['step_ms']:.3f} ms"]
    for p, res in rec["peers"].items():
        parts.append(f"{p} {res['step_ms']:.3f} ms ({res['ratio']:.2f}x)" if "step_ms" in res
                     else f"{p}: {res.get('note')}")
    return f"{rec['name']}: " + "; ".join(parts) + f"  [{rec['wall_s']:.0f} s]"


def run_suite(table=SUITE, only=None, json_path=None, backend="numba", peers=PEERS, budget_s=BUDGET_S,
              repeats=MAX_REPEATS, timeout=TIMEOUT, measure_compile=True, fuse=True, out=None, run=None):
    """Runs the (selected) entries; prints a line per entry and the markdown table; returns the document
    (also written to json_path after every entry). `run` stands in for graphc.bench.run_bench (tests)."""
    from graphc.files import atomic_write, check_writable
    out = out or sys.stdout
    entries = select(table, only)
    if json_path:
        json_path = check_writable(json_path, "benchmark JSON")     # before the benchmark, not after
    if run is None:
        from graphc.bench import run_bench as run
    doc = {"suite": "graphc bench --suite", "backend": backend, "peers": list(peers), "budget_s": budget_s,
           "timeout_s": timeout, "machine": machine(), "loadavg_start": _load(), "entries": []}
    for i, e in enumerate(entries, 1):
        print(f"[{i}/{len(entries)}] {e.name}: {e.command} --compare {','.join(peers)}", file=out, flush=True)
        t0 = time.perf_counter()
        try:
            r = run(e.model, backend=backend, batch=e.batch, train=e.train, fuse=fuse, compare=list(peers), repeats=repeats,
                    measure_compile=measure_compile, roofline=False, quiet=True, budget_s=budget_s, timeout=timeout)
        except GraphError as ex:
            r = {"error": " ".join(str(ex).split())}
        doc["entries"].append(summarize(e, r, time.perf_counter() - t0))
        print("  " + entry_line(doc["entries"][-1]), file=out, flush=True)
        doc["loadavg_end"] = _load()
        if json_path:
            atomic_write(json_path, lambda f: json.dump(doc, f, indent=1, default=str), "benchmark JSON", binary=False)
    print("\n" + markdown(doc), file=out)
    return doc


# ---------------------------------------------------------------------------------------- markdown

def _ms(v):
    return "n/a" if v is None else (f"{v:.3f} ms" if v < 1 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms")


def _cell(res, compiles=False):
    if res is None:
        return "n/a"
    if "step_ms" not in res:
        note = res.get("note") or ""
        return "over the cap" if "cap" in note else "train n/a" if "inference only" in note else "n/a"
    flag = "" if res.get("agrees") is not False else " (disagrees!)"
    extra = f", compile {res['compile_s']:.0f} s" if compiles and res.get("compile_s", 0) >= 1 else ""
    return f"{_ms(res['step_ms'])} ({res['ratio']:.2f}x{extra}){flag}"


def _mb(v):
    return "n/a" if v is None else f"{v:.0f}"


def _header(doc):
    m = doc["machine"]
    v = m.get("versions") or {}
    load = " / ".join(f"{x[0]:.2f}" for x in (doc.get("loadavg_start"), doc.get("loadavg_end")) if x)
    return (f"Measured {m['date'][:10]} with `graphc bench --suite` (graphc {m.get('graphc_commit') or '?'}, "
            f"backend {doc['backend']}) on {m['cpus']} cores of {m.get('cpu_model') or '?'} (Numba/LLVM: "
            f"{m.get('cpu_llvm') or '?'}; BLAS: {m.get('blas') or '?'}"
            f"{', OPENBLAS_CORETYPE=' + m['openblas_coretype'] if m.get('openblas_coretype') else ''}), "
            f"load average {load or '?'} at start / end; PyTorch {v.get('torch') or '-'}, "
            f"onnxruntime {v.get('onnxruntime') or '-'}, numba {v.get('numba') or '-'}. Ratios are graphc's time "
            f"/ the peer's (< 1: graphc faster); peak RSS is over the timed steps of each step process.")


def markdown(doc):
    """The README's table of a suite run (its machine, CPU, date and load above it)."""
    names = {"torch_eager": "torch eager", "torch_compile": "torch.compile", "onnxruntime": "onnxruntime"}
    peers = [p for p in ("torch_eager", "torch_compile", "onnxruntime")
             if any(p in e.get("peers", {}) for e in doc["entries"])]
    head = (["workload", "graphc (numba)"] + [names[p] for p in peers]
            + ["compile cold / warm", "peak RSS MB graphc / torch eager"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in doc["entries"]:
        if "error" in e:
            rows.append(f"| {e['name']} | error: {e['error']} |" + " |" * (len(head) - 2))
            continue
        g, ps = e["graphc"], e["peers"]
        cold, warm = g.get("compile_cold_s"), g.get("compile_warm_s")
        comp = " / ".join("n/a" if v is None else f"{v:.1f} s" for v in (cold, warm))
        mem = f"{_mb(g.get('rss_step_mb'))} / {_mb((ps.get('torch_eager') or {}).get('rss_step_mb'))}"
        rows.append("| " + " | ".join([f"`{e['command']}`", _ms(g["step_ms"])] + [_cell(ps.get(p), p == "torch_compile") for p in peers]
                                      + [comp, mem]) + " |")
    return _header(doc) + "\n\n" + "\n".join(rows)


def read(path):
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise GraphError(f"--table {path}: cannot read a suite JSON ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or "entries" not in doc or "machine" not in doc:
        raise GraphError(f"--table {path}: not a `graphc bench --suite --json` file (no entries/machine)")
    return doc


def main_from_args(args):
    """`graphc bench --suite ...` / `graphc bench --table FILE`."""
    if args.table:
        print(markdown(read(args.table)))
        return 0
    if args.model or args.batch is not None or args.train:
        raise GraphError("--suite runs its own models, batches and modes; drop MODEL, --batch and --train "
                         "(--only NAME,... picks entries)")
    if args.repeats is not None and args.repeats < 1:
        raise GraphError(f"--repeats must be at least 1, got {args.repeats}")
    peers = [c.strip() for c in args.compare.split(",") if c.strip()] if args.compare else PEERS
    run_suite(only=args.only, json_path=args.json, backend=args.backend, peers=peers,
              repeats=args.repeats or MAX_REPEATS, timeout=args.timeout or TIMEOUT,
              measure_compile=not args.no_compile_times, fuse=not args.no_fuse)
    return 0
