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


def main():
    from graphc.backends.numba.compile_stats import CompileRecorder
    from graphc.backends.numba.precompile import options_context
    rec = CompileRecorder().start()
    stdin, out = sys.stdin.buffer, sys.stdout
    while True:
        try:
            group = pickle.load(stdin)
        except EOFError:
            break
        if group is None:
            break
        try:
            for sig, spec, options in group:        # every signature of one kernel
                disp = kernel_of(spec)
                with options_context(options):
                    disp.compile(sig)
            out.write("ok\n")
        except Exception as e:           # the parent compiles them itself
            out.write("error " + " ".join(f"{type(e).__name__}: {e}".split())[:300] + "\n")
        out.flush()
    out.write("stats " + json.dumps(rec.stop().kernel_rows()) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
