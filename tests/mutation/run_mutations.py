#!/usr/bin/env python
"""Hand-written mutation testing of graphc's core: does the test suite notice a small, deliberate bug?

A developer tool, not part of the test suite (pytest does not collect this file). Each mutation in
MUTATIONS is (id, what it breaks, a code snippet, its replacement, the tests to run). For each one the
script finds the snippet in a temporary copy of the working tree (searching every .py file under
graphc/, passes/ and backends/: it must occur exactly once; files are never named, so the list
survives code moving between files), replaces it, runs the selected tests with a timeout and restores
the file. A mutation is

    killed          the selected tests failed (or timed out): the suite notices the bug
    survived        they passed: a test is missing
    equivalent      they passed, and the mutation is known to change nothing observable (its
                    `equivalent` field says why); killed anyway if a test notices something
    not applicable  the snippet is not in the code (moved or rewritten) or occurs more than once
    baseline fails  the selected tests fail on the unmutated copy: nothing can be concluded

Usage (from the repository root, with the project's environment active):

    python tests/mutation/run_mutations.py                  # every mutation (~30 min on 2 cores)
    python tests/mutation/run_mutations.py --list           # ids and descriptions
    python tests/mutation/run_mutations.py --locate         # only check that every snippet is found once
    python tests/mutation/run_mutations.py --only numba-maxpool-route-ties-last cuda-matmul-float32
    python tests/mutation/run_mutations.py --json report.json --timeout 900
    python tests/mutation/run_mutations.py --only cuda-matmul-float32 --all-failures   # every test it fails

How the copy is run: the copy's graphc/, passes/ and backends/ must be what `import graphc`,
`graphc.passes` and `graphc.backends` load, in the test process and in every child process the tests
start (the CUDA simulator drivers, the CLI tests). pyproject.toml installs passes/ and backends/ as
graphc.passes / graphc.backends (package-dir), and the developer's editable install points at the
original tree, so a PYTHONPATH entry alone is not enough. The script writes a ``sitecustomize.py`` into
a boot folder on PYTHONPATH that puts a finder first on sys.meta_path, mapping "graphc" and every
package-dir entry of the copy's pyproject.toml to the copy (it then runs the environment's own
sitecustomize, if there is one). Children inherit PYTHONPATH, so they load the copy too; the script
checks this before it starts.

Numba's on-disk caches are private to the run (NUMBA_CACHE_DIR, GRAPHC_CACHE_DIR in the temporary
folder) and every mutation starts from a copy of the caches the unmutated baseline run left, so a
mutant's compiled kernels are never reused and the developer's own caches are never touched. The first
run compiles everything once (a few minutes).

Exit status: 0 when every applicable mutation was killed (or is a known equivalent), 1 when some
survived or a baseline failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEARCHED = ("graphc", "passes", "backends")
SIM = {"NUMBA_ENABLE_CUDASIM": "1"}           # the CUDA simulator in the test process itself


@dataclass
class Mutation:
    id: str
    what: str
    find: str
    replace: str
    tests: str                                  # pytest arguments, shell syntax
    env: dict = field(default_factory=dict)
    equivalent: str = ""                        # why no test can kill it (it changes nothing observable)


# Test selections, shared by several mutations.
TIES = "tests/test_backend_ties.py"
NUMBA = "tests/test_numba_backend.py"
OPS = "tests/test_ops.py"
AUTODIFF = "tests/test_autodiff.py"
CUDA_SIM = "tests/test_cuda_backend.py"

MUTATIONS = [
    # ---------------------------------------------------------------- the three of issue 17's table
    Mutation("numba-maxpool-route-ties-last",
             "numba unfused max-pool backward (maxpool_route_source): ties go to the LAST maximum",
             '    L += _window_max(kh, kw, lambda a, b: [f"bi = (r0 + {a}) * W + c0 + {b}"])\n    L += ["                rp[i, j] = bi",',
             '    L += [s.replace("gt = v > best", "gt = v >= best")\n'
             '          for s in _window_max(kh, kw, lambda a, b: [f"bi = (r0 + {a}) * W + c0 + {b}"])]\n'
             '    L += ["                rp[i, j] = bi",',
             f"{TIES} {NUMBA} -k 'pool or route or ties'"),
    Mutation("numba-maxpool-argmax-ties-last",
             "numba maxpool_argmax / max-pool kernel source (maxpool_source): the route takes ties",
             '    L += _window_max(kh, kw, lambda a, b: [f"bi = (r0 + {a}) * W + c0 + {b}"] if save else [])',
             '    L += [s.replace("gt = v > best", "gt = v >= best")\n'
             '          for s in _window_max(kh, kw, lambda a, b: [f"bi = (r0 + {a}) * W + c0 + {b}"] if save else [])]',
             f"{TIES} {NUMBA} -k 'pool or route or ties'"),
    Mutation("cuda-matmul-float32",
             "cuda matmul result rounded to float32 (on a float64 graph too)",
             "    if len(sa) == 2 and len(sb) == 2:\n        return matmul_step(a, b, out, sa, sb, ta, tb)\n",
             "    if len(sa) == 2 and len(sb) == 2:\n"
             "        return seq([matmul_step(a, b, out, sa, sb, ta, tb),\n"
             "                    lambda: out.copy_to_device(out.copy_to_host().astype(np.float32).astype(out.dtype))])\n",
             f"{CUDA_SIM} -k 'matmul or seed_cnn'", SIM),

    # ---------------------------------------------------------------- op semantics and gate rules
    Mutation("ops-max-grad-ties-to-first",
             "max gate: a tie's gradient goes to the first input instead of the second",
             "win_a = g.gt(a, b)", "win_a = g.sub(g.scalar(1.0), g.gt(b, a))",
             f"{AUTODIFF} {OPS} {TIES} -k 'max or tie or relu'"),
    Mutation("ops-relu-grad-one-at-zero",
             "relu'(0) = 1 instead of 0",
             "return [g.mul(dy, g.gt(x, g.scalar(0.0)))]",
             "return [g.mul(dy, g.sub(g.scalar(1.0), g.gt(g.scalar(0.0), x)))]",
             f"{AUTODIFF} {OPS} {TIES} -k 'relu or tie or max'"),
    Mutation("ops-pool-argmax-last",
             "reference max-pool route (argmax_index): the last maximum of a window instead of the first",
             "    a = win.argmax(axis=-1)\n",
             "    a = win.shape[-1] - 1 - win[..., ::-1].argmax(axis=-1)\n",
             f"{OPS} {TIES} -k 'route or pool or plateau'"),
    Mutation("ops-saved-route-keeps-zero-max",
             "maxpool_argmax(relu=True) routes a window whose max is exactly 0 (>= 0 instead of > 0)",
             "idx = np.where(win_max > 0, idx, ~idx)", "idx = np.where(win_max >= 0, idx, ~idx)",
             f"{OPS} -k 'route or every_op'"),
    Mutation("ops-route-scatter-keeps-masked",
             "route_scatter adds the whole gradient of a window the ReLU masked (route < 0), not dy * 0",
             "v = np.where(masked, dy.reshape(-1) * 0, dy.reshape(-1))", "v = dy.reshape(-1)",
             f"{OPS} -k 'route or every_op'"),
    Mutation("ops-conv-dx-no-rotation",
             "conv dL/dX with the filter not rotated by 180 degrees",
             "w_rot = w[:, :, ::-1, ::-1].reshape(groups", "w_rot = w.reshape(groups",
             f"{OPS} {AUTODIFF} -k 'conv'"),
    Mutation("ops-conv-dw-ignores-stride",
             "conv dL/dW gathers input patches at stride 1 whatever the stride",
             "cols = im2col(x, k_hw[0], k_hw[1], stride, pads, dilation)",
             "cols = im2col(x, k_hw[0], k_hw[1], (1, 1), pads, dilation)",
             f"{OPS} {AUTODIFF} -k 'conv'"),
    Mutation("ops-sce-grad-not-mean",
             "softmax-cross-entropy gradient (O - y) * dy, without the 1/m of the batch mean",
             "return ((softmax_ref(z, 1) - y) * (dy / z.shape[0])).astype(z.dtype)",
             "return ((softmax_ref(z, 1) - y) * dy).astype(z.dtype)",
             f"{OPS} {AUTODIFF} -k 'softmax or ce or seed'"),
    Mutation("ops-softmax-grad-sign",
             "softmax Jacobian rule y * (dy + sum(dy * y)) instead of y * (dy - sum(dy * y))",
             "return [g.mul(y, g.sub(dy, g.sum(g.mul(dy, y), axes=axis, keepdims=True)))]",
             "return [g.mul(y, g.add(dy, g.sum(g.mul(dy, y), axes=axis, keepdims=True)))]",
             f"{AUTODIFF} -k 'softmax'"),
    Mutation("ops-sigmoid-grad-missing-factor",
             "sigmoid'(x) = s instead of s (1 - s)",
             "return [g.mul(dy, g.mul(s, g.sub(g.scalar(1.0), s)))]", "return [g.mul(dy, s)]",
             f"{AUTODIFF} -k 'sigmoid'"),
    Mutation("ops-mean-spread-count",
             "mean's gradient divided by count + 1",
             "return (out / _count(like_shape, axes)).astype(dy.dtype)",
             "return (out / (_count(like_shape, axes) + 1)).astype(dy.dtype)",
             f"{AUTODIFF} {OPS} -k 'mean or broadcast or loss or mse'"),
    Mutation("ops-avgpool-spread-square-window",
             "average-pool backward shares dy over size[0]**2 (wrong for non-square windows)",
             "share = dy / (size[0] * size[1])", "share = dy / (size[0] * size[0])",
             f"{AUTODIFF} {OPS} -k 'avgpool or average'"),
    Mutation("ops-sum-to-leading-axes-only",
             "sum_to sums only the leading broadcast axes, not the size-1 ones",
             "    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)\n"
             "    return np.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x",
             "    axes = tuple(range(lead))\n"
             "    return np.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x",
             f"{AUTODIFF} {OPS} -k 'sum_to or broadcast or add or mul'"),

    # ---------------------------------------------------------------- autodiff
    Mutation("autodiff-fanout-keeps-first-gradient",
             "the gradient adder (copy:add) keeps only the first gradient of a value used twice",
             "                    for p in parts[1:]:\n                        dy = g.add(dy, p)",
             "                    for p in parts[1:1]:\n                        dy = g.add(dy, p)",
             f"{AUTODIFF} -k 'copy or fork or tied or fan or zoo or resnet'"),
    Mutation("autodiff-seed-two",
             "the backward pass is seeded with dL/dL = 2",
             '"value": np.asarray(1.0)}', '"value": np.asarray(2.0)}',
             f"{AUTODIFF} -k 'gradcheck_every_op and (add or mul or conv)'"),
    Mutation("autodiff-contributions-to-irrelevant-values",
             "gate rules' gradients for values not on a path to the loss are kept (relevance test dropped)",
             "if gx is None or x.name not in relevant:", "if gx is None:",
             f"{AUTODIFF} tests/test_render.py -k 'not gradcheck_every_op'",
             equivalent="the backward loop skips the contributions of every value not on a path from wrt "
                        "to the loss before using them (`name not in relevant: continue`), and the gradient "
                        "nodes the rules built for those values are pruned at the end either way; the shape "
                        "check and the grad_of tag now also run on them, but every built-in rule gives each "
                        "input its own node of the input's shape: only wasted graph-building work"),
    Mutation("copies-no-gate-for-two-uses",
             "copy gates inserted only for values used three or more times",
             "        if uses < 2:\n            continue", "        if uses < 3:\n            continue",
             f"{AUTODIFF} tests/test_render.py -k 'copy or fork or tied or fan'"),

    # ---------------------------------------------------------------- fusion and other passes
    Mutation("fuse-route-without-relu",
             "the fused conv-ReLU-pool saves a route that also routes all-zero windows (relu=False)",
             'attrs=lambda g, m: dict(_window(g, m), relu=True)', 'attrs=lambda g, m: dict(_window(g, m), relu=False)',
             f"{TIES} tests/test_passes.py -k 'fused or conv or fuse'"),
    Mutation("fuse-protected-not-results",
             "a fused group's protected members (outputs, updates) are not made results",
             "results = [m for m in members if m in prot or any(u not in mset for u in g.nx.successors(m))]",
             "results = [m for m in members if any(u not in mset for u in g.nx.successors(m))]",
             f"tests/test_passes.py {NUMBA} -k 'fuse or fused or chain or optimizer'"),
    Mutation("fuse-no-convexity-check",
             "elementwise groups merged even when a path leaves the group and comes back (a cycle)",
             "            if not _convex(g, merged, pos):\n                continue",
             "            if False:\n                continue",
             f"tests/test_passes.py {NUMBA} -k 'fuse or fused or chain or zoo or optimizer'"),
    Mutation("fuse-pool-attrs-unchecked",
             "conv-pool fusion does not check that the backward route's pool attrs match the forward pool's",
             'return all(m.attrs(g, "route_grad")[k] == m.attrs(g, "pool")[k] for k in POOL_WINDOW)',
             'return True',
             f"tests/test_passes.py {TIES} -k 'fuse or fused or conv'"),
    Mutation("fuse-mixes-forward-and-backward",
             "elementwise groups mix forward and backward nodes",
             '\n            and (da["role"] == "forward") == (db["role"] == "forward"))', ')',
             f"tests/test_passes.py {NUMBA} -k 'fuse or fused or chain or optimizer or zoo'"),
    Mutation("simplify-units-swapped",
             "simplify drops x * 0 and x + 1 instead of x * 1 and x + 0",
             "        if is_const_fill(g, b, opd.unit) and _same_type(g, a, n):\n            return a\n"
             "        if opd.commutative and is_const_fill(g, a, opd.unit) and _same_type(g, b, n):",
             "        if is_const_fill(g, b, 1.0 - opd.unit) and _same_type(g, a, n):\n            return a\n"
             "        if opd.commutative and is_const_fill(g, a, 1.0 - opd.unit) and _same_type(g, b, n):",
             f"tests/test_passes.py {AUTODIFF} -k 'simplify or pass or adam or seed'"),
    Mutation("cse-sub-commutative",
             "common-subexpression elimination treats a - b and b - a as equal",
             "    if optable.OPS[op].commutative:\n        ins = tuple(sorted(ins))",
             "    if optable.OPS[op].commutative or op == \"sub\":\n        ins = tuple(sorted(ins))",
             "tests/test_passes.py"),
    Mutation("memory-output-shares-input-slot",
             "memory plan frees an input's slot before the node that reads it last has run",
             "        for r in release.get(i - 1, []):", "        for r in release.get(i, []):",
             f"tests/test_passes.py {NUMBA} -k 'memory or plan or zoo or optimizer or interface'"),

    # ---------------------------------------------------------------- numba lowering
    Mutation("numba-inline-constant-off",
             "numba elementwise kernels' literals (inlined constants, attributes, the formulas' numbers) "
             "slightly wrong (+1e-3)",
             'lines += [f"    {name} = _T({text})" for text, name in self.consts.items()] + head',
             'lines += [f"    {name} = _T({text} + 1e-3)" for text, name in self.consts.items()] + head',
             f"{NUMBA} -k 'unary or binary or chain'"),
    Mutation("numba-matmul-ignores-trans-b",
             "numba matmul ignores trans_b for weights known at bind time",
             "a, b = _t(stat[0], ta), _t(stat[1], tb)", "a, b = _t(stat[0], ta), stat[1]",
             f"{NUMBA} -k 'matmul or chain or optimizer'"),
    Mutation("numba-mean-no-scale",
             "numba mean is a sum (no 1/count)",
             "(out, scale), fix=lambda a: a.reshape(form))", "(out, 1.0), fix=lambda a: a.reshape(form))",
             f"{NUMBA} -k 'reductions or softmax or losses'"),
    Mutation("numba-broadcast-like-mean-no-scale",
             "numba broadcast_like(mean=True) spreads the gradient without dividing by the count",
             'scale = 1.0 / max(int(np.prod([out.shape[d] for d in axes], dtype=np.int64)), 1) if ctx.attrs["mean"]',
             'scale = 1.0 if ctx.attrs["mean"]',
             f"{NUMBA} -k 'reductions or broadcast or mse or losses'"),
    Mutation("numba-nonsquare-pool-routes-zero-windows",
             "numba fused conv-ReLU + non-square pool: windows the ReLU zeroed get a plain route (not ~index < 0)",
             "maxpool_source(kh, kw, sh, sw, save, True,", "maxpool_source(kh, kw, sh, sw, save, False,",
             f"{TIES} {NUMBA} -k 'conv_relu_maxpool or fused_conv'"),
    Mutation("numba-route-relu-bias-grad-counts-dropped",
             "numba route_relu: the bias gradient sums the whole dy of windows the ReLU masked (route < 0), not dy * 0",
             '"                acc += dp[i, j] if rp[i, j] >= 0 else dp[i, j] * 0.0"', '"                acc += dp[i, j]"',
             f"{TIES} {NUMBA} -k 'conv_relu_maxpool or fused_conv or variants'"),
    Mutation("numba-route-scatter-fast-path-overlaps",
             "numba route_scatter takes the write-once path for overlapping windows",
             "if kh and sh >= kh and sw >= kw:", "if kh and sh >= kh - 1 and sw >= kw - 1:",
             f"{TIES} {NUMBA} -k 'route or conv_relu_maxpool or fused_conv or variants'"),
    Mutation("numba-parallel-sum-starts-at-one",
             "numba's parallel reduction kernel (used above PARALLEL_MIN elements) starts its sums at 1",
             "    for k0 in prange(K0):\n        acc = np.zeros(K1, np.float64)",
             "    for k0 in prange(K0):\n        acc = np.ones(K1, np.float64)",
             f"{NUMBA} tests/test_numba_large.py -k 'reductions or parallel or sum'"),
    Mutation("numba-softmax-no-max-shift",
             "numba softmax without subtracting the row max (overflows for large logits)",
             "        e = math.exp(z[i, k] - m)\n        out[i, k] = e",
             "        e = math.exp(z[i, k])\n        out[i, k] = e",
             f"{NUMBA} tests/test_numba_large.py -k 'softmax or losses or large'"),
    Mutation("numba-sce-first-label",
             "numba softmax cross-entropy reads every row's label from row 0",
             "        m = _row_max(z, i)\n        tot += (z[i, lab] - m)",
             "        m = _row_max(z, i)\n        tot += (z[i, labels[0]] - m)",
             f"{NUMBA} -k 'losses or zoo'"),

    # ---------------------------------------------------------------- numba conv kernels
    Mutation("numba-im2col-pool-epilogue-ties-last",
             "numba im2col conv-ReLU-pool epilogue: ties go to the last maximum",
             "                    if v > m:\n                        m = v\n                        mi = (r0 + di) * Wo + c0 + dj",
             "                    if v >= m:\n                        m = v\n                        mi = (r0 + di) * Wo + c0 + dj",
             f"{TIES} tests/test_numba_conv.py -k 'fused or ties or route'"),
    Mutation("numba-direct-pool-epilogue-ties-last",
             "numba generated direct conv-ReLU-pool kernel: ties go to the last maximum",
             'a(f"{i3}gt = v > m")', 'a(f"{i3}gt = v >= m")',
             f"{TIES} tests/test_numba_conv.py -k 'fused or ties or route or bind_direct'"),
    Mutation("numba-maxpool-route-loop-ties-last",
             "numba max-pool route for windows over 64 taps (maxpool_route_loop_k, global max pool's "
             "gradient): ties go to the last maximum",
             "if v > best or (v != v and best == best):\n                            best = v\n"
             "                            bp, bq = r0 + a, c0 + b",
             "if v >= best or (v != v and best == best):\n                            best = v\n"
             "                            bp, bq = r0 + a, c0 + b",
             "tests/test_numba_norm.py -k 'global_max'"),

    # ---------------------------------------------------------------- cuda kernels (simulator)
    Mutation("cuda-maxpool-ties-last",
             "cuda max-pool kernel: ties go to the last maximum",
             "                    if v > best or (v != v and best == best):\n                        best = v\n"
             "                        bi = idx",
             "                    if v >= best or (v != v and best == best):\n                        best = v\n"
             "                        bi = idx",
             f"{CUDA_SIM} -k 'ties'", SIM),
    Mutation("cuda-conv-relu-pool-ties-last",
             "cuda fused conv-ReLU-pool kernel: ties go to the last maximum",
             "if v > best or (v != v and best == best):      # the first NaN wins (np.max)",
             "if v >= best or (v != v and best == best):      # the first NaN wins (np.max)",
             f"{CUDA_SIM} -k 'ties'", SIM),
]


# ============================================================================== the temporary copy

def tree_files(root: Path):
    """The working tree's files: tracked and untracked-but-not-ignored (git), else everything but
    caches and environments."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                             capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p and (root / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}
        return [str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(root).parts)]


def package_dirs(tree: Path):
    """{package: directory} the copy's imports must resolve to: graphc plus pyproject's package-dir."""
    dirs = {"graphc": tree / "graphc"}
    with open(tree / "pyproject.toml", "rb") as f:
        meta = tomllib.load(f)
    for pkg, d in meta.get("tool", {}).get("setuptools", {}).get("package-dir", {}).items():
        if pkg:
            dirs[pkg] = tree / d
    return {k: str(v) for k, v in dirs.items()}


_BOOT = '''# Written by tests/mutation/run_mutations.py: load graphc from the mutation copy.
import importlib.util, os, sys

_DIRS = {dirs!r}


class _MutationCopy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        d = _DIRS.get(name)
        if d is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"),
                                                      submodule_search_locations=[d])


sys.meta_path.insert(0, _MutationCopy)
_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:                      # the environment's own sitecustomize, if any, still runs
    _f = os.path.join(os.path.abspath(_d or "."), "sitecustomize.py")
    if os.path.dirname(_f) != _here and os.path.isfile(_f):
        exec(compile(open(_f).read(), _f, "exec"), {{"__name__": "sitecustomize", "__file__": _f}})
        break
'''


class Workspace:
    def __init__(self, base: Path | None, keep: bool):
        self.dir = Path(tempfile.mkdtemp(prefix="graphc-mutation-", dir=base))
        self.keep = keep
        self.tree = self.dir / "tree"
        for rel in tree_files(ROOT):
            dst = self.tree / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst)
        boot = self.dir / "boot"
        boot.mkdir()
        (boot / "sitecustomize.py").write_text(_BOOT.format(dirs=package_dirs(self.tree)))
        self.caches = self.dir / "caches"           # the baseline's caches, copied for each mutation
        (self.caches / "numba").mkdir(parents=True)
        (self.caches / "graphc").mkdir(parents=True)
        self.env = dict(os.environ)
        self.env.pop("NUMBA_ENABLE_CUDASIM", None)
        pp = os.environ.get("PYTHONPATH")
        self.env.update(PYTHONPATH=os.pathsep.join([str(boot), str(self.tree)] + ([pp] if pp else [])),
                        PYTHONDONTWRITEBYTECODE="1")

    def close(self):
        if self.keep:
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def check_imports(self):
        code = ("import graphc, graphc.passes, graphc.backends, graphc.ops; "
                "print('\\n'.join(m.__file__ for m in (graphc, graphc.passes, graphc.backends, graphc.ops)))")
        r = subprocess.run([sys.executable, "-c", code], cwd=self.tree, env=self.env, capture_output=True,
                           text=True, timeout=300)
        files = r.stdout.split()
        if r.returncode or len(files) != 4 or not all(Path(f).resolve().is_relative_to(self.tree) for f in files):
            sys.exit(f"the copy's packages are not the ones imported:\n{r.stdout}{r.stderr}")

    def sources(self):
        for top in SEARCHED:
            yield from sorted((self.tree / top).rglob("*.py"))

    def locate(self, snippet):
        """[(path, count)] of the files holding snippet."""
        hits = []
        for p in self.sources():
            n = p.read_text().count(snippet)
            if n:
                hits.append((p, n))
        return hits

    def run_tests(self, args, extra_env, cache_dir, timeout, first_failure=True):
        """(status, failing test ids, seconds, output tail) of one pytest run."""
        env = dict(self.env, NUMBA_CACHE_DIR=str(cache_dir / "numba"), GRAPHC_CACHE_DIR=str(cache_dir / "graphc"),
                   **extra_env)
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-o", "addopts="] \
            + (["-x"] if first_failure else []) + args
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=self.tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return "timeout", [], time.time() - t0, out[-3000:]
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        status = {0: "passed", 1: "failed", 2: "failed", 3: "failed"}.get(proc.returncode, f"error rc={proc.returncode}")
        return status, failed, time.time() - t0, out[-3000:]


# ================================================================================= the run

def run(mutations, timeout, json_path, base, keep, all_failures=False):
    ws = Workspace(base, keep)
    results = []
    try:
        ws.check_imports()
        print(f"copy of {ROOT} in {ws.tree}")
        baseline = {}
        for m in mutations:                                       # each distinct selection, unmutated
            key = (m.tests, tuple(sorted(m.env.items())))
            if key in baseline:
                continue
            st, failed, sec, tail = ws.run_tests(shlex.split(m.tests), m.env, ws.caches, timeout)
            baseline[key] = (st, failed, tail)
            print(f"baseline  {st:8s} {sec:6.0f}s  {m.tests}{' (simulator)' if m.env else ''}", flush=True)
        for m in mutations:
            res = {"id": m.id, "what": m.what, "tests": m.tests}
            hits = ws.locate(m.find)
            count = sum(n for _, n in hits)
            if count != 1:
                res.update(status="not applicable",
                           why="snippet not found" if not hits else
                           f"snippet found {count} times: " + ", ".join(str(p.relative_to(ws.tree)) for p, _ in hits))
            elif baseline[(m.tests, tuple(sorted(m.env.items())))][0] != "passed":
                b = baseline[(m.tests, tuple(sorted(m.env.items())))]
                res.update(status="baseline fails", why=f"{b[0]}: {b[1][:3]}", tail=b[2])
            else:
                path = hits[0][0]
                res["file"] = str(path.relative_to(ws.tree))
                text, st_ = path.read_text(), path.stat()
                scratch = ws.dir / "mutant-caches"
                shutil.copytree(ws.caches, scratch)
                try:
                    path.write_text(text.replace(m.find, m.replace))
                    status, failed, sec, tail = ws.run_tests(shlex.split(m.tests), m.env, scratch, timeout,
                                                             first_failure=not all_failures)
                finally:
                    path.write_text(text)
                    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))
                    shutil.rmtree(scratch, ignore_errors=True)
                killed = status in ("failed", "timeout")
                survived = "equivalent" if m.equivalent else "survived"
                res.update(status="killed" if killed else (survived if status == "passed" else status),
                           killed_by=failed, seconds=round(sec, 1))
                if m.equivalent:
                    res["why"] = m.equivalent
                if not killed:
                    res["tail"] = tail
            results.append(res)
            extra = ", ".join(res.get("killed_by", [])[:2]) or res.get("why", "")
            print(f"{res['status']:15s} {m.id:45s} {extra}", flush=True)
    finally:
        ws.close()
    report(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    bad = [r for r in results if r["status"] not in ("killed", "equivalent", "not applicable")]
    return 1 if bad else 0


def report(results):
    counts = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" of {len(results)} mutations")
    for r in results:
        if r["status"] == "killed":
            print(f"  killed    {r['id']}: {r['killed_by'][0] if r['killed_by'] else '(timeout)'}")
    for r in results:
        if r["status"] != "killed":
            print(f"  {r['status']:9s} {r['id']}: {r['what']} {r.get('why', '')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--locate", action="store_true", help="only check that every snippet occurs exactly once")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run (default 900)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tmp", type=Path, help="folder for the temporary copy (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--all-failures", action="store_true",
                    help="run a mutant's whole selection and list every failing test (default: stop at the first)")
    a = ap.parse_args(argv)
    ids = [m.id for m in MUTATIONS]
    assert len(set(ids)) == len(ids), "duplicate mutation ids"
    chosen = MUTATIONS
    if a.only:
        unknown = sorted(set(a.only) - set(ids))
        if unknown:
            ap.error(f"unknown mutation ids {unknown}; see --list")
        chosen = [m for m in MUTATIONS if m.id in a.only]
    if a.list:
        for m in chosen:
            print(f"{m.id:45s} {m.what}" + (" [equivalent]" if m.equivalent else ""))
        return 0
    if a.locate:
        bad = 0
        for m in chosen:
            hits = [(p, p.read_text().count(m.find)) for top in SEARCHED for p in sorted((ROOT / top).rglob("*.py"))]
            hits = [(p, n) for p, n in hits if n]
            n = sum(c for _, c in hits)
            where = ", ".join(f"{p.relative_to(ROOT)}" + (f" x{c}" if c > 1 else "") for p, c in hits) or "-"
            print(f"{'ok' if n == 1 else 'NOT UNIQUE' if n else 'NOT FOUND':10s} {m.id:45s} {where}")
            bad += n != 1
        return 1 if bad else 0
    return run(chosen, a.timeout, a.json, a.tmp, a.keep, a.all_failures)


if __name__ == "__main__":
    sys.exit(main())
