"""Tests of the cuda backend's kernels (backends/cuda/kernels/) against numpy references (im2col conv, loops for the backward passes).

How the CUDA simulator is switched on without disturbing the rest of the suite
------------------------------------------------------------------------------
numba reads NUMBA_ENABLE_CUDASIM when ``numba.cuda`` is first imported, and the choice then holds for the
whole process.  Setting it from this module would leak into every other test of the same pytest process
(another backend's tests would suddenly run in the slow simulator, or fail because numba.cuda was already
imported without it).  So this module never sets it in-process:

* if the kernels can run *in this process* - the simulator is already on (NUMBA_ENABLE_CUDASIM=1 was set
  before numba.cuda was imported), or there is a real GPU - the kernel tests run here directly;
* otherwise ``test_kernels_in_cuda_simulator`` re-runs this file in a child ``python -m pytest`` with
  NUMBA_ENABLE_CUDASIM=1, and the in-process kernel tests skip (the child's report is shown on failure).

``test_every_kernel_compiles_to_ptx`` and ``test_cuda_status_*`` also run in children (no simulator), so
this process never imports numba.cuda because of these tests.  The PTX test needs numba-cuda with NVVM
(``pip install 'numba-cuda[cu13]'``; no GPU needed). It skips only where numba.cuda or libNVVM cannot
be loaded; where a toolkit is installed, a kernel that does not compile fails it.

Shapes are tiny: the simulator runs every CUDA thread as a Python thread.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)


import cuda_children as children  # noqa: E402
from graphc.backends.cuda import kernels as ck  # noqa: E402
from graphc.errors import BackendError  # noqa: E402


def _decide_here():
    """(run kernel tests in this process?, why)."""
    if "numba.cuda" in sys.modules or os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0") \
            or os.path.exists("/dev/nvidiactl"):
        ok, reason = ck.cuda_status()
        return ok, reason
    return False, "no GPU and the simulator is off in this process"


RUN_HERE, HERE_REASON = _decide_here()
needs_cuda = pytest.mark.skipif(not RUN_HERE, reason=f"{HERE_REASON}: these tests run in the simulator child "
                                                     f"started by test_kernels_in_cuda_simulator")


_NOT_IN_CHILD = ("test_kernels_in_cuda_simulator", "ptx", "cuda_status")     # the child's -k leaves these out


def _tests_the_child_runs():
    """Every test function of this module the child's -k selects, times its parametrizations: the
    exact number of passes to expect (a test that silently stops running fails the driver)."""
    n = 0
    for name, fn in sorted(globals().items()):
        if not name.startswith("test_") or not callable(fn) or any(k in name for k in _NOT_IN_CHILD):
            continue
        cases = 1
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                cases *= len(mark.args[1])
        n += cases
    return n


def test_kernels_in_cuda_simulator(request):
    if RUN_HERE:
        pytest.skip(f"kernel tests ran in this process ({HERE_REASON.split(';')[0]})")
    children.start_for_session(request.session)     # with the PTX check and test_cuda_backend.py's children
    rc, out, err = children.wait("kernels_sim", 600)
    tail = (out + err)[-8000:]
    assert rc == 0, f"simulator child failed (rc={rc}):\n{tail}"
    m = re.search(r"(\d+) passed", out)
    expected = _tests_the_child_runs()
    assert m and int(m.group(1)) == expected and "skipped" not in out and "failed" not in out, (expected, tail)


_STATUS_SCRIPT = r"""
import sys, json
from graphc.backends.cuda import kernels as ck
imported_early = "numba.cuda" in sys.modules
ok, reason = ck.cuda_status()
err = None
try:
    ck.require_cuda()
except Exception as e:
    err = [type(e).__name__, str(e)]
import numpy as np
launch_err = None
try:
    ck.host.conv2d(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 3, 3), np.float32))
except Exception as e:
    launch_err = type(e).__name__
print(json.dumps({"imported_early": imported_early, "ok": ok, "reason": reason, "err": err,
                  "sim": ck.is_simulator(), "launch_err": launch_err}))
"""


def _status_child(sim):
    r = subprocess.run([sys.executable, "-c", _STATUS_SCRIPT, ROOT], cwd=ROOT, env=children.child_env(sim),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cuda_status_without_simulator():
    st = _status_child(sim=False)
    assert st["imported_early"] is False          # importing the module does not import numba.cuda
    assert st["sim"] is False
    if st["ok"]:
        assert st["err"] is None and "GPU" in st["reason"] and st["launch_err"] is None
    else:
        assert st["launch_err"] == "BackendError"       # a kernel call fails with the same clear error
        assert st["err"][0] == "BackendError"
        assert "NUMBA_ENABLE_CUDASIM=1" in st["err"][1] and "pip install 'graphc[cuda]'" in st["err"][1]
        assert "NVIDIA GPU" in st["err"][1]
        assert st["reason"]


def test_cuda_status_with_simulator():
    st = _status_child(sim=True)
    assert st["ok"] is True and st["sim"] is True and st["err"] is None and st["launch_err"] is None
    assert "simulator" in st["reason"].lower()


_PTX_SCRIPT = r"""
import sys, json, time, os, re, shutil, subprocess, tempfile
import numpy as np
from graphc.backends.cuda import kernels as ck
# Skip only where there is nothing to compile with: numba.cuda or the CUDA toolkit's libNVVM missing
# (both ImportErrors). Where a toolkit is installed, every failure below -- a kernel that does not
# compile -- is a test failure, not a skip.
try:
    from numba.cuda.cudadrv import nvvm
    nvvm.NVVM()
except ImportError as e:
    print(json.dumps({"skip": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}))
    sys.exit(0)
EW = [("a0 * (a1 > 0)", 2), ("a0 - 0.01 * a1", 2), ("a0 - s0 * a1", 2),
      (("s0*a1 + (1-s0)*a0", "s1*a2 + (1-s1)*a0*a0", "a3 - s2*o0/(sqrt(o1) + s3)"), 4),
      ("where(a0 > 0, a0, 0.1 * (exp(a0) - 1))", 1), ("tanh(a0) * a1 ** 2 + max(a0, a1, 0)", 2)]
F64_OPS = re.compile(r"^\s*(add|sub|mul|fma\.rn|div\.rn|cvt\.f64\.f32|cvt\.rn\.f64)\S*\.f64\b", re.M)
ptxas = shutil.which("ptxas") or next((p for p in ("/usr/local/cuda/bin/ptxas",) if os.path.exists(p)), None)
t = time.time()
out = {}
tmp = tempfile.mkdtemp()
# float32: every kernel; float64 (compile time): the shared-memory ones, whose smem doubles
SUBSET64 = ("igemm_fwd", "conv_relu_pool", "reduce_keep_mid", "xent_grad")
for dt in (np.float32, np.float64):
    res = ck.compile_ptx_all(cc=(9, 0), dtype=dt, elementwise=EW if dt == np.float32 else EW[3:4],
                             names=None if dt == np.float32 else SUBSET64)
    rep = {}
    for k, v in res.items():
        info = {"sm_90": ".target sm_90" in v, "entry": ".entry" in v, "f64": len(F64_OPS.findall(v)),
                "shared": ".shared" in v}
        if ptxas:
            fn = os.path.join(tmp, "k.ptx")
            open(fn, "w").write(v)
            r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90", fn, "-o", os.devnull],
                               capture_output=True, text=True)
            txt = r.stdout + r.stderr
            if r.returncode != 0 and re.search(r"[Uu]nsupported \.version", txt):
                ptxas = None          # this ptxas is older than the PTX ISA that NVVM emitted: no check
            else:
                info["ptxas_rc"] = r.returncode
                m = re.search(r"Used (\d+) registers", txt)
                info["regs"] = int(m.group(1)) if m else None
                m = re.search(r"(\d+) bytes spill stores", txt)
                info["spill"] = int(m.group(1)) if m else None
                m = re.search(r"(\d+) bytes smem", txt)
                info["smem"] = int(m.group(1)) if m else 0
        rep[k] = info
    out[np.dtype(dt).name] = rep
print(json.dumps({"seconds": time.time() - t, "ptxas": ptxas, "res": out}))
"""


children.register("kernels_sim", children.pytest_child(THIS, " and ".join(f"not {k}" for k in _NOT_IN_CHILD)), sim=True,
                  driver="test_kernels_in_cuda_simulator")
children.register("kernels_ptx", [sys.executable, "-c", _PTX_SCRIPT, ROOT], sim=False,
                  driver="test_every_kernel_compiles_to_ptx")


#: kernels that accumulate in float64 on purpose, as the reference: sums (a float32 partial sum overflows
#: where the sum does not; memory-bound, so the wider adds do not show) and the cross-entropy rows
F64_BY_DESIGN = ("reduce_keep_mid", "reduce_mid", "xent_rows", "xent_dense_rows")


def test_every_kernel_compiles_to_ptx():
    rc, out, err = children.wait("kernels_ptx", 900)
    assert rc == 0, f"a CUDA toolkit is installed and a kernel failed to compile to PTX:\n{(out + err)[-4000:]}"
    rep = json.loads(out.strip().splitlines()[-1])
    if "skip" in rep:
        pytest.skip(f"no CUDA toolkit here (numba.cuda or libNVVM cannot be loaded; pip install "
                    f"'numba-cuda[cu13]'): {rep['skip']}")
    assert len(rep["res"]["float32"]) >= 22, rep["res"]["float32"].keys()
    for dt, res in rep["res"].items():
        for name, info in res.items():
            assert info["sm_90"] and info["entry"], (dt, name)
            if dt == "float32":
                # float32 kernels do float32 arithmetic only (no silent promotion to double), but these
                assert (info["f64"] > 0) == (name.split("[")[0] in F64_BY_DESIGN), (name, info)
            if rep["ptxas"]:   # assembled for sm_90: no register spills, static shared memory within 48 KiB
                assert info["ptxas_rc"] == 0 and info["spill"] == 0, (dt, name, info)
                assert info["smem"] <= 48 * 1024, (dt, name, info)
        for name in ("igemm_fwd", "igemm_dx", "igemm_dw", "igemm_mm", "conv_relu_pool", "reduce_keep_mid",
                     "reduce_mid", "softmax", "xent_grad"):
            if name not in res:
                continue
            assert res[name]["shared"], (dt, name)
            if rep["ptxas"]:   # 256-thread blocks: <= 128 registers keeps >= 2 blocks per SM
                assert res[name]["regs"] <= 128, (dt, name, res[name])


# =========================================================================================================
# numpy references
# =========================================================================================================

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pads(p):
    if isinstance(p, int):
        return (p,) * 4
    return (p[0], p[0], p[1], p[1]) if len(p) == 2 else tuple(p)


def conv_ref(x, w, b, stride, pads):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    N, C, H, W = x.shape
    K, _, KH, KW = w.shape
    sh, sw = _pair(stride)
    pt, pb, pl, pr = _pads(pads)
    Ho, Wo = (H + pt + pb - KH) // sh + 1, (W + pl + pr - KW) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    cols = np.empty((N, C, KH, KW, Ho, Wo))
    for kh in range(KH):
        for kw in range(KW):
            cols[:, :, kh, kw] = xp[:, :, kh:kh + sh * (Ho - 1) + 1:sh, kw:kw + sw * (Wo - 1) + 1:sw]
    y = np.einsum("kr,nrp->nkp", w.reshape(K, -1), cols.reshape(N, C * KH * KW, Ho * Wo)).reshape(N, K, Ho, Wo)
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def conv_dx_ref(dy, w, stride, pads, in_hw):
    dy = dy.astype(np.float64)
    w = w.astype(np.float64)
    N, K, Ho, Wo = dy.shape
    _, C, KH, KW = w.shape
    H, W = in_hw
    sh, sw = _pair(stride)
    pt, pb, pl, pr = _pads(pads)
    dxp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    for kh in range(KH):
        for kw in range(KW):
            dxp[:, :, kh:kh + sh * (Ho - 1) + 1:sh, kw:kw + sw * (Wo - 1) + 1:sw] += \
                np.einsum("nkhw,kc->nchw", dy, w[:, :, kh, kw])
    return dxp[:, :, pt:pt + H, pl:pl + W]


def conv_dw_ref(x, dy, stride, pads, k_hw):
    x = x.astype(np.float64)
    dy = dy.astype(np.float64)
    N, K, Ho, Wo = dy.shape
    KH, KW = k_hw
    sh, sw = _pair(stride)
    pt, pb, pl, pr = _pads(pads)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    dw = np.zeros((K, x.shape[1], KH, KW))
    for kh in range(KH):
        for kw in range(KW):
            dw[:, :, kh, kw] = np.einsum("nkhw,nchw->kc", dy,
                                         xp[:, :, kh:kh + sh * (Ho - 1) + 1:sh, kw:kw + sw * (Wo - 1) + 1:sw])
    return dw


def maxpool_ref(x, size, stride):
    N, C, H, W = x.shape
    PH, PW = _pair(size)
    sh, sw = _pair(stride)
    Ho, Wo = (H - PH) // sh + 1, (W - PW) // sw + 1
    y = np.empty((N, C, Ho, Wo), x.dtype)
    route = np.empty((N, C, Ho, Wo), np.int32)
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    win = x[n, c, i * sh:i * sh + PH, j * sw:j * sw + PW]
                    a = int(np.argmax(win))          # first max in row-major order
                    y[n, c, i, j] = win.flat[a]
                    route[n, c, i, j] = (i * sh + a // PW) * W + j * sw + a % PW
    return y, route


def route_backward_ref(dy, route, hw):
    N, C = dy.shape[:2]
    dz = np.zeros((N, C, hw[0] * hw[1]))
    for n in range(N):
        for c in range(C):
            for o, r in zip(dy[n, c].ravel(), route[n, c].ravel()):
                dz[n, c, r if r >= 0 else ~r] += o if r >= 0 else o * 0       # ~r: masked by a ReLU
    return dz.reshape(N, C, *hw)


def avgpool_ref(x, size, stride):
    N, C, H, W = x.shape
    PH, PW = _pair(size)
    sh, sw = _pair(stride)
    Ho, Wo = (H - PH) // sh + 1, (W - PW) // sw + 1
    y = np.empty((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            y[:, :, i, j] = x[:, :, i * sh:i * sh + PH, j * sw:j * sw + PW].astype(np.float64).mean(axis=(2, 3))
    return y


def avgpool_bwd_ref(dy, size, stride, hw):
    N, C, Ho, Wo = dy.shape
    PH, PW = _pair(size)
    sh, sw = _pair(stride)
    dx = np.zeros((N, C, *hw))
    for i in range(Ho):
        for j in range(Wo):
            dx[:, :, i * sh:i * sh + PH, j * sw:j * sw + PW] += dy[:, :, i:i + 1, j:j + 1] / (PH * PW)
    return dx


def softmax_ref(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _tol(dt):
    return dict(rtol=1e-4, atol=1e-5) if dt == np.float32 else dict(rtol=1e-10, atol=1e-12)


def _rng(seed=0):
    return np.random.default_rng(seed)


# =========================================================================================================
# kernel tests (run in-process when CUDA or the simulator is on here; else inside the simulator child)
# =========================================================================================================

CONV_CASES = [  # (N, C, H, W, K, KH, KW, stride, pads)
    (2, 2, 6, 6, 3, 3, 3, 1, 1),
    (2, 2, 7, 6, 3, 3, 2, (2, 1), (1, 0, 2, 1)),
    (1, 3, 5, 5, 2, 1, 1, 2, 0),
]


@needs_cuda
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward(case):
    N, C, H, W, K, KH, KW, stride, pads = case
    r = _rng(1)
    x = r.standard_normal((N, C, H, W)).astype(np.float32)
    w = r.standard_normal((K, C, KH, KW)).astype(np.float32)
    b = r.standard_normal(K).astype(np.float32)
    ref = conv_ref(x, w, b, stride, pads)
    y = ck.host.conv2d(x, w, b, stride=stride, pads=pads)
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, **_tol(np.float32))
    yr = ck.host.conv2d(x, w, None, stride=stride, pads=pads, relu=True)
    np.testing.assert_allclose(yr, np.maximum(conv_ref(x, w, None, stride, pads), 0), **_tol(np.float32))


@needs_cuda
def test_conv2d_float64():
    r = _rng(2)
    x = r.standard_normal((2, 2, 5, 5))
    w = r.standard_normal((20, 2, 3, 3))     # 17..32 output channels: the 32-row tile variant
    b = r.standard_normal(20)
    y = ck.host.conv2d(x, w, b, 1, 1)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, conv_ref(x, w, b, 1, 1), **_tol(np.float64))


@needs_cuda
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_dx_dw_db(case):
    N, C, H, W, K, KH, KW, stride, pads = case
    r = _rng(3)
    x = r.standard_normal((N, C, H, W)).astype(np.float32)
    w = r.standard_normal((K, C, KH, KW)).astype(np.float32)
    Ho, Wo = conv_ref(x, w, None, stride, pads).shape[2:]
    dy = r.standard_normal((N, K, Ho, Wo)).astype(np.float32)
    dx = ck.host.conv2d_dx(dy, w, stride, pads, (H, W))
    np.testing.assert_allclose(dx, conv_dx_ref(dy, w, stride, pads, (H, W)), **_tol(np.float32))
    dw = ck.host.conv2d_dw(x, dy, stride, pads, (KH, KW))
    np.testing.assert_allclose(dw, conv_dw_ref(x, dy, stride, pads, (KH, KW)), **_tol(np.float32))
    db = ck.host.conv2d_db(dy)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2, 3)), **_tol(np.float32))


@needs_cuda
def test_conv2d_dw_split_k_and_adjointness():
    # a long reduction (N*Ho*Wo) with a short output: the split-K (grid z + atomics) path
    r = _rng(4)
    x = r.standard_normal((2, 2, 6, 6)).astype(np.float32)
    dy = r.standard_normal((2, 2, 6, 6)).astype(np.float32)
    dw = ck.host.conv2d_dw(x, dy, 1, 1, (3, 3))
    np.testing.assert_allclose(dw, conv_dw_ref(x, dy, 1, 1, (3, 3)), **_tol(np.float32))
    # <conv(x, w), dy> == <x, conv_dx(dy, w)> == <w, conv_dw(x, dy)>
    w = r.standard_normal((2, 2, 3, 3)).astype(np.float32)
    y = ck.host.conv2d(x, w, None, 1, 1)
    dx = ck.host.conv2d_dx(dy, w, 1, 1, (6, 6))
    a = float(np.vdot(y.astype(np.float64), dy))
    assert abs(a - float(np.vdot(x.astype(np.float64), dx))) < 1e-3 * max(1, abs(a))
    assert abs(a - float(np.vdot(w.astype(np.float64), dw))) < 1e-3 * max(1, abs(a))


FUSED_CASES = [  # (N, C, H, W, K, k, stride, pads, pool, pool_stride)
    (2, 2, 6, 6, 3, 3, 1, 1, 2, 2),
    (2, 2, 7, 7, 3, 3, 1, 1, 3, 2),     # overlapping windows, odd size (floor)
    (1, 2, 8, 8, 2, 3, 2, (1, 0, 1, 0), (2, 2), (1, 2)),
    (1, 1, 6, 6, 2, 1, 1, 0, 5, 1),     # 25-position window: the unfused fallback path
]


def _fused_ref(x, w, b, stride, pads, pool, pstride):
    z = conv_ref(x, w, b, stride, pads)
    ym, r = maxpool_ref(np.maximum(z, 0), pool, pstride)      # the first max of the ReLU output ...
    return ym, np.where(ym > 0, r, ~r).astype(np.int32), z     # ... ~ it where it is not > 0


@needs_cuda
@pytest.mark.parametrize("case", FUSED_CASES)
def test_conv2d_relu_maxpool_and_route_backward(case):
    N, C, H, W, K, k, stride, pads, pool, pstride = case
    r = _rng(5)
    x = r.standard_normal((N, C, H, W)).astype(np.float32)
    w = r.standard_normal((K, C, k, k)).astype(np.float32)
    b = np.linspace(-1.5, 0.5, K).astype(np.float32)      # some windows end all <= 0: route ~first
    yref, rref, z = _fused_ref(x, w, b, stride, pads, pool, pstride)
    y, route = ck.host.conv2d_relu_maxpool(x, w, b, stride, pads, pool, pstride, save_route=True)
    assert route.dtype == np.int32 and route.shape == y.shape == yref.shape
    np.testing.assert_allclose(y, yref, **_tol(np.float32))
    np.testing.assert_array_equal(route, rref)
    y2 = ck.host.conv2d_relu_maxpool(x, w, b, stride, pads, pool, pstride)
    np.testing.assert_array_equal(y2, y)
    dy = r.standard_normal(y.shape).astype(np.float32)
    dz = ck.host.maxpool_route_backward(dy, route, z.shape[2:])
    np.testing.assert_allclose(dz, route_backward_ref(dy, rref, z.shape[2:]), **_tol(np.float32))


@needs_cuda
def test_conv2d_relu_maxpool_ties_and_zero():
    x = np.zeros((1, 1, 4, 4), np.float32)
    w = np.ones((2, 1, 3, 3), np.float32)
    b = np.array([0.5, 0.0], np.float32)        # channel 0: all equal and > 0 -> first; channel 1: all 0 -> ~first
    y, route = ck.host.conv2d_relu_maxpool(x, w, b, 1, 1, 2, 2, save_route=True)
    np.testing.assert_array_equal(y[0, 0], np.full((2, 2), 0.5, np.float32))
    np.testing.assert_array_equal(route[0, 0], [[0, 2], [8, 10]])
    np.testing.assert_array_equal(y[0, 1], 0)
    np.testing.assert_array_equal(route[0, 1], [[~0, ~2], [~8, ~10]])


@needs_cuda
@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2), ((2, 3), (1, 2))])
def test_maxpool2d_and_backward(size, stride):
    r = _rng(6)
    x = r.integers(-3, 3, (2, 2, 7, 6)).astype(np.float32)    # many ties
    yref, rref = maxpool_ref(x, size, stride)
    y, route = ck.host.maxpool2d(x, size, stride, save_route=True)
    np.testing.assert_array_equal(y, yref)
    np.testing.assert_array_equal(route, rref)
    np.testing.assert_array_equal(ck.host.maxpool2d(x, size, stride), yref)
    dy = r.standard_normal(y.shape).astype(np.float32)
    dx = ck.host.maxpool2d_backward(dy, route, (7, 6))
    np.testing.assert_allclose(dx, route_backward_ref(dy, rref, (7, 6)), **_tol(np.float32))


@needs_cuda
@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2), ((2, 3), (1, 2))])
def test_avgpool2d_and_backward(size, stride):
    r = _rng(7)
    x = r.standard_normal((2, 2, 7, 6)).astype(np.float32)
    y = ck.host.avgpool2d(x, size, stride)
    np.testing.assert_allclose(y, avgpool_ref(x, size, stride), **_tol(np.float32))
    dy = r.standard_normal(y.shape).astype(np.float32)
    dx = ck.host.avgpool2d_backward(dy, size, stride, (7, 6))
    np.testing.assert_allclose(dx, avgpool_bwd_ref(dy, size, stride, (7, 6)), **_tol(np.float32))


@needs_cuda
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul(ta, tb):
    r = _rng(8)
    a = r.standard_normal((70 if ta == tb else 20, 9)).astype(np.float32)   # 64-row and 32-row tiles
    b = r.standard_normal((9, 66)).astype(np.float32)
    A = np.ascontiguousarray(a.T) if ta else a
    B = np.ascontiguousarray(b.T) if tb else b
    c = ck.host.matmul(A, B, trans_a=ta, trans_b=tb)
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, **_tol(np.float32))


@needs_cuda
def test_matmul_split_k_bias_float64():
    r = _rng(9)
    a = r.standard_normal((3, 200))
    b = r.standard_normal((200, 5))
    bias = r.standard_normal(5)
    c = ck.host.matmul(a, b, bias=bias)
    assert c.dtype == np.float64
    np.testing.assert_allclose(c, a @ b + bias, **_tol(np.float64))
    with pytest.raises(BackendError):
        ck.host.matmul(a, b.T.copy())


@needs_cuda
def test_sums():
    r = _rng(10)
    x4 = r.standard_normal((2, 3, 4, 5)).astype(np.float32)
    x2 = r.standard_normal((7, 5)).astype(np.float32)
    big = r.standard_normal(2500).astype(np.float32)        # split over 2 blocks + second pass
    t = _tol(np.float32)
    s = ck.host.sum(x4)
    assert s.shape == ()
    np.testing.assert_allclose(s, x4.astype(np.float64).sum(), **t)
    np.testing.assert_allclose(ck.host.sum(big), big.astype(np.float64).sum(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ck.host.sum(x2, axes=0), x2.astype(np.float64).sum(0), **t)
    np.testing.assert_allclose(ck.host.sum(x2, axes=(1,)), x2.astype(np.float64).sum(1), **t)
    np.testing.assert_allclose(ck.host.sum(x4, axes=(0, 2, 3)), x4.astype(np.float64).sum((0, 2, 3)), **t)
    np.testing.assert_allclose(ck.host.sum(x4, axes=(1,)), x4.astype(np.float64).sum(1), **t)
    np.testing.assert_allclose(ck.host.sum(x4, axes=(0, 2)), x4.astype(np.float64).sum((0, 2)), **t)
    np.testing.assert_allclose(ck.host.sum(x4, axes=(1, 3)), x4.astype(np.float64).sum((1, 3)), **t)
    k = ck.host.sum(x4, axes=(0, 2, 3), keepdims=True, scale=0.5)
    np.testing.assert_allclose(k, 0.5 * x4.astype(np.float64).sum((0, 2, 3), keepdims=True), **t)


@needs_cuda
def test_softmax_and_cross_entropy():
    r = _rng(11)
    z = (3 * r.standard_normal((5, 40))).astype(np.float32)    # 40 > 32 columns: strided rows
    lab = r.integers(0, 40, 5).astype(np.int32)
    p = softmax_ref(z)
    np.testing.assert_allclose(ck.host.softmax(z), p, **_tol(np.float32))
    ref_loss = -np.log(p[np.arange(5), lab]).mean()
    loss = ck.host.softmax_xent(z, lab)
    assert loss.shape == () and loss.dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(ck.host.softmax_xent(z, lab.astype(np.int64)), ref_loss, rtol=1e-5)
    onehot = np.eye(40)[lab]
    g = ck.host.softmax_xent_grad(z, lab, 2.0)
    np.testing.assert_allclose(g, (p - onehot) / 5 * 2.0, **_tol(np.float32))
    g2 = ck.host.softmax_xent_grad(z, lab, np.array([0.5], np.float32))
    np.testing.assert_allclose(g2, (p - onehot) / 5 * 0.5, **_tol(np.float32))
    bad = lab.copy()
    bad[0] = 40
    assert np.isnan(ck.host.softmax_xent(z, bad))


@needs_cuda
def test_elementwise_kernels():
    r = _rng(12)
    a = r.standard_normal(300).astype(np.float32)
    g = r.standard_normal(300).astype(np.float32)
    a[:3] = 0.0
    relu_grad = ck.elementwise_kernel("a0 * (a1 > 0)", 2)
    assert ck.elementwise_kernel("a0 * (a1 > 0)", 2) is relu_grad       # cached
    out = ck.host.to_host(relu_grad(ck.to_device(g), ck.to_device(a)))
    np.testing.assert_array_equal(out, g * (a > 0))                     # 0 at 0
    assert out.dtype == np.float32
    sgd = ck.elementwise_kernel("a0 - 0.01 * a1", 2)
    np.testing.assert_allclose(ck.to_host(sgd(ck.to_device(a), ck.to_device(g))), a - np.float32(0.01) * g,
                               rtol=1e-6)
    # scalars and in-place update
    p = ck.to_device(a.reshape(15, 20))
    sgd2 = ck.elementwise_kernel("a0 - s0 * a1", 2)
    assert sgd2.n_scalars == 1
    res = sgd2(p, ck.to_device(g.reshape(15, 20)), scalars=(0.1,), out=p)
    assert res is p and res.shape == (15, 20)
    np.testing.assert_allclose(p.copy_to_host().ravel(), a - np.float32(0.1) * g, rtol=1e-6)
    # Adam, three outputs written in place, one kernel
    m0 = r.standard_normal(300).astype(np.float32)
    v0 = r.random(300).astype(np.float32)
    p0 = r.standard_normal(300).astype(np.float32)
    b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
    adam = ck.elementwise_kernel(("s0*a1 + (1-s0)*a0", "s1*a2 + (1-s1)*a0*a0", "a3 - s2*o0/(sqrt(o1) + s3)"), 4)
    dm, dv, dp = (ck.to_device(v) for v in (m0, v0, p0))
    outs = adam(ck.to_device(g), dm, dv, dp, scalars=(b1, b2, lr, eps), out=(dm, dv, dp))
    assert outs == (dm, dv, dp)
    m1 = b1 * m0 + (1 - b1) * g
    v1 = b2 * v0 + (1 - b2) * g * g
    np.testing.assert_allclose(dm.copy_to_host(), m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv.copy_to_host(), v1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dp.copy_to_host(), p0 - lr * m1 / (np.sqrt(v1) + eps), rtol=1e-5, atol=1e-6)
    # functions, where, float64, integer output
    e = ck.elementwise_kernel("where(a0 > 0, a0, 0.1 * (exp(a0) - 1)) + max(a0, 0) * 0", 1)
    a64 = a.astype(np.float64)
    np.testing.assert_allclose(ck.to_host(e(ck.to_device(a64))), np.where(a64 > 0, a64, 0.1 * np.expm1(a64)),
                               rtol=1e-12, atol=1e-12)
    mask = ck.elementwise_kernel("a0 > 0 and not a1 < 0", 2)(ck.to_device(a), ck.to_device(g), dtype=np.int32)
    np.testing.assert_array_equal(ck.to_host(mask), ((a > 0) & ~(g < 0)).astype(np.int32))
    half = ck.elementwise_kernel("a0 * 0.5 + 0.5", 1)(ck.to_device(np.arange(6, dtype=np.int32)))
    np.testing.assert_array_equal(ck.to_host(half), [0, 1, 1, 2, 2, 3])   # int kernel: float math, truncating store
    for bad in ("a0 + b", "a2 * 2", "import os", "a0.real", "o0 + 1", "__import__('os')"):
        with pytest.raises(BackendError):
            ck.elementwise_kernel(bad, 2)(ck.to_device(a), ck.to_device(g))
    with pytest.raises(BackendError):
        relu_grad(ck.to_device(a), ck.to_device(g[:10]))


@needs_cuda
def test_bad_arguments_raise_backend_error():
    x = ck.to_device(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(BackendError):
        ck.conv2d(x, ck.to_device(np.zeros((3, 1, 3, 3), np.float32)))         # channel mismatch
    with pytest.raises(BackendError):
        ck.conv2d(x, ck.to_device(np.zeros((3, 2, 3, 3), np.float64)))         # dtype mismatch
    with pytest.raises(BackendError):
        ck.maxpool2d(x, 5)
    empty = ck.host.conv2d(np.zeros((0, 2, 4, 4), np.float32), np.zeros((3, 2, 3, 3), np.float32), None, 1, 1)
    assert empty.shape == (0, 3, 4, 4)
    with pytest.raises(BackendError):
        ck.conv2d_dx(ck.to_device(np.zeros((1, 3, 3, 3), np.float32)),
                     ck.to_device(np.zeros((3, 2, 3, 3), np.float32)), 1, 1, (4, 4))


# ---------------------------------------------------------------- grouped, dilated and depthwise convs

GROUPED_CASES = [  # (N, C, H, W, K, KH, KW, stride, pads, dilation, groups)
    (2, 4, 6, 5, 6, 3, 3, 1, 1, 1, 2),                      # two groups
    (1, 4, 7, 6, 4, 3, 2, (2, 1), (1, 0, 2, 1), (2, 1), 2),  # strided, dilated, asymmetric pads
    (2, 3, 6, 6, 6, 3, 3, 2, (2, 1), 2, 3),                  # depthwise, two filters per channel, via igemm
]


@needs_cuda
@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_dilated_conv_igemm(case):
    from graphc.ops.conv import conv_dw_ref as gdw, conv_dx_ref as gdx, conv_ref as gref
    N, C, H, W, K, KH, KW, stride, pads, dil, G = case
    r = _rng(7)
    x = r.standard_normal((N, C, H, W)).astype(np.float32)
    w = r.standard_normal((K, C // G, KH, KW)).astype(np.float32)
    b = r.standard_normal(K).astype(np.float32)
    geo = (_pair(stride), _pads(pads), _pair(dil), G)
    y = gref(x, w, b, *geo)
    np.testing.assert_allclose(ck.host.conv2d(x, w, b, stride, pads, dilation=dil, groups=G), y, **_tol(np.float32))
    np.testing.assert_allclose(ck.host.conv2d(x, w, b, stride, pads, relu=True, dilation=dil, groups=G),
                               np.maximum(y, 0), **_tol(np.float32))
    dy = r.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_allclose(ck.host.conv2d_dx(dy, w, stride, pads, (H, W), dilation=dil, groups=G),
                               gdx(dy, w, geo[0], geo[1], (H, W), geo[2], G), **_tol(np.float32))
    np.testing.assert_allclose(ck.host.conv2d_dw(x, dy, stride, pads, (KH, KW), dilation=dil, groups=G),
                               gdw(x, dy, geo[0], geo[1], (KH, KW), geo[2], G), rtol=1e-4, atol=1e-4)


@needs_cuda
def test_igemm_clip_epilogue_float64():
    from graphc.backends.cuda.kernels.gemm import conv_geometry, conv_step
    from graphc.ops.conv import conv_ref as gref
    r = _rng(8)
    x, w, b = r.standard_normal((1, 4, 5, 5)), r.standard_normal((4, 2, 3, 3)), r.standard_normal(4)
    flat = lambda a: a.reshape(a.size)  # noqa: E731
    z = gref(x, w, b, (1, 1), (1,) * 4, (1, 1), 2)
    for clip, want in (((0.0, 0.5), np.clip(z, 0, 0.5)), ((None, 0.5), np.minimum(z, 0.5))):
        y = ck.device_zeros((1, 4, 5, 5), np.float64)
        conv_step(flat(ck.to_device(x)), flat(ck.to_device(w)), flat(ck.to_device(b)), flat(y),
                  conv_geometry(x.shape, w.shape, 1, 1, 1, 2), clip=clip)()
        np.testing.assert_allclose(ck.to_host(y), want, **_tol(np.float64))


DEPTHWISE_CASES = [  # (N, C, M, H, W, KH, KW, stride, pads, dilation)
    (2, 3, 1, 6, 5, 3, 3, 1, 1, 1),
    (1, 2, 2, 7, 7, 3, 2, (2, 1), (3, 0, 1, 2), (1, 2)),    # two filters per channel; pads > the filter
    (1, 1, 1, 48, 48, 3, 3, 2, 1, 1),                        # 2304 output positions: dL/dW in two slices
]


@needs_cuda
@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_depthwise_kernels(case):
    from graphc.ops.conv import conv_dw_ref as gdw, conv_dx_ref as gdx, conv_ref as gref
    N, C, M, H, W, KH, KW, stride, pads, dil = case
    r = _rng(9)
    for dt in (np.float32, np.float64):
        x = r.standard_normal((N, C, H, W)).astype(dt)
        w = r.standard_normal((C * M, 1, KH, KW)).astype(dt)
        b = r.standard_normal(C * M).astype(dt)
        geo = (_pair(stride), _pads(pads), _pair(dil), C)
        y = gref(x, w, b, *geo)
        got = ck.host.depthwise_conv2d(x, w, b, stride, pads, dil, clip=(0.0, 6.0))
        assert got.dtype == dt
        np.testing.assert_allclose(got, np.clip(y, 0, 6), **_tol(dt))
        np.testing.assert_allclose(ck.host.depthwise_conv2d(x, w, None, stride, pads, dil), y - b[:, None, None],
                                   **_tol(dt))
        dy = r.standard_normal(y.shape).astype(dt)
        np.testing.assert_allclose(ck.host.depthwise_conv2d_dx(dy, w, stride, pads, (H, W), dil, channels=C),
                                   gdx(dy, w, geo[0], geo[1], (H, W), geo[2], C), **_tol(dt))
        np.testing.assert_allclose(ck.host.depthwise_conv2d_dw(x, dy, stride, pads, (KH, KW), dil),
                                   gdw(x, dy, geo[0], geo[1], (KH, KW), geo[2], C),
                                   **(dict(rtol=1e-4, atol=1e-3) if dt == np.float32 else _tol(dt)))
