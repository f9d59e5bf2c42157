"""Where a cold compile goes: every Numba compilation of this process, timed (wall and CPU), with its
typing and LLVM shares, grouped by kernel; plus the seconds the conv strategy timing and the thread
count timing took. `graphc bench` records it in its cold-compile probe (a fresh process with empty
caches) and prints the breakdown.

    rec = CompileRecorder().start()
    ... compile and run ...
    rec.stop(); rec.breakdown()   # {"kernels": [...], "totals": {...}}

Numba announces each compilation as a "numba:compile" event (loads from the disk cache are not
compilations) and each stretch under its LLVM lock as "numba:llvm_lock"; nested compilations (a
kernel's callees) are counted inside their caller. The garbage collector's pauses within each are
timed too (gc.callbacks).
"""
from __future__ import annotations

import gc
import time

# what the generated kernels' module names start with -> the kind of kernel (one per shape/geometry)
GENERATED = {"graphc_kernel_": "conv (per shape)", "graphc_pool_": "pool (per geometry)",
             "graphc_ew_": "elementwise (per op group)", "graphc_loss_": "mean loss (per formula)"}

# seconds spent timing conv strategies and thread counts in this process (strategy.py and the
# numba executor add to these)
TUNING = {"strategy_s": 0.0, "strategies_timed": 0, "threads_s": 0.0, "threads_timed": 0}


# compilations done for this process by compile workers (backends/numba/precompile.py): their rows
REMOTE: list = []


def add_remote(rows) -> None:
    REMOTE.extend(rows)


def add_tuning(kind: str, seconds: float) -> None:
    TUNING[kind + "_s"] += seconds
    TUNING[kind + "_timed" if kind == "threads" else "strategies_timed"] += 1


def kernel_kind(module: str) -> str:
    for prefix, kind in GENERATED.items():
        if module.startswith(prefix):
            return kind
    return "generic (" + module.rsplit(".", 1)[-1] + ")"


class CompileRecorder:
    """Listens to Numba's compile events between start() and stop()."""

    def __init__(self):
        self.rows = []                  # (depth, dispatcher, args, wall, cpu, llvm wall, gc wall)
        self._stack = []
        self._llvm = []
        self._gc = [0.0, 0.0]           # when the running collection started, seconds of collections
        self._listener = None
        self._tuning0 = dict(TUNING)
        self._remote0 = len(REMOTE)

    def start(self):
        from numba.core import event

        rec = self

        class _Listener(event.Listener):
            def on_start(self, ev):
                if ev.kind == "numba:compile":
                    rec._stack.append((ev.data, time.perf_counter(), time.process_time(), len(rec._llvm),
                                       rec._gc[1]))
                else:
                    rec._llvm.append([time.perf_counter(), None])

            def on_end(self, ev):
                if ev.kind == "numba:compile":
                    data, t0, c0, k, g0 = rec._stack.pop()
                    llvm = sum(e - s for s, e in rec._llvm[k:] if e is not None)
                    rec.rows.append((len(rec._stack), data.get("dispatcher"), data.get("args"),
                                     time.perf_counter() - t0, time.process_time() - c0, llvm, rec._gc[1] - g0))
                elif rec._llvm and rec._llvm[-1][1] is None:
                    rec._llvm[-1][1] = time.perf_counter()

        self._listener = _Listener()
        for kind in ("numba:compile", "numba:llvm_lock"):
            event.register(kind, self._listener)
        gc.callbacks.append(self._on_gc)
        self._tuning0 = dict(TUNING)
        self._remote0 = len(REMOTE)
        return self

    def stop(self):
        from numba.core import event
        if self._listener is not None:
            for kind in ("numba:compile", "numba:llvm_lock"):
                event.unregister(kind, self._listener)
            self._listener = None
            if self._on_gc in gc.callbacks:
                gc.callbacks.remove(self._on_gc)
        return self

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc[0] = time.perf_counter()
        else:
            self._gc[1] += time.perf_counter() - self._gc[0]

    @staticmethod
    def _typing_s(disp, args):
        """Seconds of the type-inference passes of one compiled overload (its callees' compiles
        included), from Numba's pipeline timers; None when Numba does not keep them."""
        try:
            md = disp.overloads[tuple(args)].metadata
            times = md["pipeline_times"]
        except Exception:
            return None
        return sum(t.run for passes in times.values() for name, t in passes.items() if "type_inference" in name)

    def kernel_rows(self):
        """One dict per top-level compilation of this process (callees counted in their caller)."""
        rows, nested = [], 0
        for depth, disp, args, wall, cpu, llvm, gc_s in self.rows:
            if depth:
                nested += 1
                continue
            fn = getattr(disp, "py_func", None)
            module = getattr(fn, "__module__", "?") or "?"
            typing = self._typing_s(disp, args)
            rows.append({"kernel": f"{module}.{getattr(fn, '__name__', '?')}", "kind": kernel_kind(module),
                         "parallel": bool(getattr(disp, "targetoptions", {}).get("parallel")),
                         "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "llvm_s": round(llvm, 3),
                         "typing_s": None if typing is None else round(typing, 3), "gc_s": round(gc_s, 3),
                         "nested": nested})
            nested = 0
        return rows

    def breakdown(self, top=12):
        """{"totals": {...}, "by_kind": {kind: {count, wall_s, cpu_s}}, "tuning": {...}, "kernels": [the
        `top` slowest]}, this process's compilations and those its compile workers reported."""
        remote = REMOTE[self._remote0:]
        rows = self.kernel_rows() + [dict(r, process="worker") for r in remote]
        by_kind = {}
        tot = {"kernels": 0, "signatures": len(rows), "wall_s": 0.0, "cpu_s": 0.0, "llvm_s": 0.0, "typing_s": 0.0,
               "gc_s": 0.0,
               "parallel_kernels": 0, "generated_kernels": 0, "nested_compiles": 0, "in_workers": len(remote)}
        seen = set()
        for r in rows:
            if r["kernel"] not in seen:
                seen.add(r["kernel"])
                tot["kernels"] += 1
                tot["parallel_kernels"] += r["parallel"]
                tot["generated_kernels"] += not r["kind"].startswith("generic")
            for k in ("wall_s", "cpu_s", "llvm_s"):
                tot[k] += r[k]
            tot["typing_s"] += r["typing_s"] or 0.0
            tot["gc_s"] += r.get("gc_s") or 0.0
            tot["nested_compiles"] += r.get("nested", 0)
            k = by_kind.setdefault(r["kind"], {"count": 0, "wall_s": 0.0, "cpu_s": 0.0})
            k["count"] += 1
            k["wall_s"] += r["wall_s"]
            k["cpu_s"] += r["cpu_s"]
        rows.sort(key=lambda r: -r["wall_s"])
        tuning = {k: TUNING[k] - self._tuning0.get(k, 0) for k in TUNING}
        return {"totals": {k: round(v, 3) if isinstance(v, float) else v for k, v in tot.items()},
                "by_kind": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in sorted(by_kind.items())},
                "tuning": {k: round(v, 3) if isinstance(v, float) else v for k, v in tuning.items()},
                "kernels": rows[:top]}


def format_breakdown(bd, indent="  "):
    """The breakdown as report lines."""
    t, tu = bd["totals"], bd["tuning"]
    lines = [f"{indent}{t['kernels']} kernels compiled ({t['signatures']} signatures, {t.get('in_workers', 0)} of them in "
             f"compile workers, {t['generated_kernels']} "
             f"generated per shape/geometry, {t['parallel_kernels']} Numba-parallel, {t['nested_compiles']} "
             f"nested callees): {t['wall_s']:.2f} s wall, {t['cpu_s']:.2f} s CPU; typing {t['typing_s']:.2f} s, "
             f"LLVM {t['llvm_s']:.2f} s, garbage collection {t.get('gc_s', 0.0):.2f} s",
             f"{indent}tuning: conv strategy timing {tu['strategy_s']:.2f} s ({tu['strategies_timed']} timed), "
             f"thread-count timing {tu['threads_s']:.2f} s ({tu['threads_timed']} bindings)"]
    for kind, v in bd["by_kind"].items():
        lines.append(f"{indent}  {kind:32s} {v['count']:3d} compiles {v['wall_s']:7.2f} s wall {v['cpu_s']:7.2f} s CPU")
    for k in bd["kernels"]:
        lines.append(f"{indent}  {k['wall_s']:6.2f} s ({k['cpu_s']:.2f} CPU, LLVM {k['llvm_s']:.2f}"
                     f"{'' if k['typing_s'] is None else ', typing %.2f' % k['typing_s']})"
                     f"{' parallel' if k['parallel'] else ''}{' [worker]' if k.get('process') else ''}  "
                     f"{k['kernel'][-60:]}")
    return lines
