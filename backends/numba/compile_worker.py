"""A compile worker (backends/numba/precompile.py starts them): reads pickled jobs from stdin until a
None, each the signatures of one kernel [(argument types, where the kernel is, LLVM options)],
compiles them into Numba's disk cache (the environment, so the cache directories, are its parent's)
and answers "ok" or "error" per job on stdout; at the end one "stats" line with its compile
breakdown (compile_stats)."""
from __future__ import annotations

import importlib
import json
import os
import pickle
import sys


def kernel_of(spec):
    """The dispatcher a job names: ("module", module, name) or ("file", path, prefix, name)."""
    if spec[0] == "module":
        return getattr(importlib.import_module(spec[1]), spec[2])
    from graphc.backends.kernel_cache import load_generated
    with open(spec[1], encoding="utf-8") as f:
        load_generated(f.read(), spec[2])         # the same text: the same module name and file
    return getattr(sys.modules[os.path.basename(spec[1])[:-3]], spec[3])


def serve(jobs, out, kernels):
    """The worker's loop: pickled jobs read from `jobs` until a None or the end, each turned by
    `kernels(job)` into [(dispatcher, argument types, LLVM options)] and compiled (into Numba's disk
    cache); "ok" or "error ..." written to `out` per job, then a "stats" line. The heap of its imports
    is left out of the garbage collector's scans (precompile.heap_frozen; a forked worker's is so
    already)."""
    from graphc.backends.numba.compile_stats import CompileRecorder
    from graphc.backends.numba.precompile import compile_for, heap_frozen
    rec = CompileRecorder().start()
    with heap_frozen():
        while True:
            try:
                job = pickle.load(jobs)
            except EOFError:
                break
            if job is None:
                break
            try:
                for disp, sig, options in kernels(job):      # every signature of one kernel
                    compile_for(disp, sig, options)
                out.write("ok\n")
            except Exception as e:           # the parent compiles them itself
                out.write("error " + " ".join(f"{type(e).__name__}: {e}".split())[:300] + "\n")
            out.flush()
    out.write("stats " + json.dumps(rec.stop().kernel_rows()) + "\n")
    out.flush()


def main():
    serve(sys.stdin.buffer, sys.stdout, lambda group: [(kernel_of(spec), sig, options) for sig, spec, options in group])


if __name__ == "__main__":
    main()
