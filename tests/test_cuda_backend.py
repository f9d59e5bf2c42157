"""Differential tests of the cuda backend (backends/cuda/) against the reference backend, in Numba's
CUDA simulator: every op family (forward and, through gc.grad, backward), every fused pattern
(conv_relu_maxpool forward + route backward, conv_relu, elementwise chains, optimizer updates), a tiny
conv net's forward and training steps (SGD with momentum, Adam; fusion on and off), seed_cnn's SGD step
against the course notes, device residency of parameters and optimizer state, and the clear error on a machine
with neither a GPU nor the simulator.

How the simulator is switched on (as tests/test_cuda_kernels.py does): numba reads NUMBA_ENABLE_CUDASIM
when numba.cuda is first imported, and other test files import numba in the main pytest process, so
this module never sets it in-process. When CUDA can run here (the simulator was on before numba.cuda was
imported, or a GPU exists) the tests run in this process; otherwise the driver tests re-run this file in
three child ``python -m pytest`` processes with NUMBA_ENABLE_CUDASIM=1 (the "sim_a", "sim_b" and "sim_c"
thirds, of about equal time, side by side with test_cuda_kernels.py's child: tests/cuda_children.py), and
the in-process tests skip. The no-GPU test and the PTX check run in children without the simulator.

Shapes are tiny (batch 2, 6x6 images, 1-3 channels): the simulator runs every CUDA thread as a Python
thread (a training step of the tiny conv net takes about 3 s).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
from graphc import models
from graphc.backends.cuda import kernels as ck
import cuda_children as children
import nan_graphs
from tie_graphs import (assert_exact, conv_pool_ties, plateau_max, plateau_pool, plateau_route, pool_ties,
                        relu_max_ties, route_ties)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)
RTOL, ATOL = 2e-4, 2e-5


def _decide_here():
    if "numba.cuda" in sys.modules or os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0") \
            or os.path.exists("/dev/nvidiactl"):
        return ck.cuda_status()
    return False, "no GPU and the simulator is off in this process"


RUN_HERE, HERE_REASON = _decide_here()
needs_cuda = pytest.mark.skipif(not RUN_HERE, reason=f"{HERE_REASON}: these tests run in the simulator "
                                                     "children started by test_backend_in_cuda_simulator")


# ============================================================================ drivers (parent process)

@pytest.mark.parametrize("half", ["sim_a", "sim_b", "sim_c"])
def test_backend_in_cuda_simulator(request, half):
    if RUN_HERE:
        pytest.skip(f"the backend tests ran in this process ({HERE_REASON.split(';')[0]})")
    children.start_for_session(request.session)     # every child at once: they run side by side
    rc, out, err = children.wait(half, 600)
    tail = (out + err)[-8000:]
    assert rc == 0, f"simulator child {half} failed (rc={rc}):\n{tail}"
    m = re.search(r"(\d+) passed", out)
    expected = sum(1 for name in re.findall(r"^def (test_\w+)", open(THIS).read(), re.M) if half in name)
    assert m and int(m.group(1)) == expected and "skipped" not in out and "failed" not in out, tail


_NO_GPU_SCRIPT = r"""
import json, sys
import numpy as np
import graphc as gc
from graphc.errors import BackendError
g = gc.Graph("g")
x = g.input("x", (None, 3))
g.output(g.relu(x))
try:
    gc.compile(g, backend="cuda")
    res = {"raised": None}
except BackendError as e:
    res = {"raised": "BackendError", "msg": str(e)}
except Exception as e:
    res = {"raised": type(e).__name__, "msg": str(e)}
from graphc.backends.cuda import kernels as ck
try:
    ck.require_cuda()
    res["require"] = None
except BackendError as e:
    res["require"] = str(e)
print(json.dumps(res))
"""


def test_cuda_backend_without_gpu_or_simulator_raises_clear_error():
    r = subprocess.run([sys.executable, "-c", _NO_GPU_SCRIPT], cwd=ROOT, env=children.child_env(False),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["raised"] is None:
        pytest.skip("a CUDA GPU is usable here: nothing to refuse")
    assert res["raised"] == "BackendError", res
    assert res["msg"] == res["require"], res                # the message of kernels.require_cuda()
    assert "NUMBA_ENABLE_CUDASIM=1" in res["msg"] and "pip install 'graphc[cuda]'" in res["msg"], res


def test_bench_cuda_without_gpu_says_why_in_one_line():
    r = subprocess.run([sys.executable, "-m", "graphc.cli", "bench", "seed_cnn", "--backend", "cuda"], cwd=ROOT,
                       env=children.child_env(False), capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        pytest.skip("a CUDA GPU is usable here: the benchmark ran")
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "cuda" in err.lower() and ("GPU" in err or "simulator" in err), err


_PTX_SCRIPT = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
# Skip only where there is nothing to compile with: numba.cuda or the CUDA toolkit's libNVVM missing
# (both ImportErrors). Where a toolkit is installed, every failure below -- a kernel that does not
# compile -- is a test failure, not a skip.
try:
    from numba.cuda.cudadrv import nvvm
    nvvm.NVVM()
except ImportError as e:
    print(json.dumps({"skip": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}))
    sys.exit(0)
import graphc as gc
from graphc.pipeline import Pipeline
from graphc.passes.transforms.training import training_graph
from graphc.backends import cuda as cb
sys.path.insert(0, sys.argv[1] + "/tests")
from test_cuda_backend import tiny_convnet, losses_graph
from test_custom_ops import custom_graph, declare_ops
declare_ops()
F64 = re.compile(r"^\s*(add|sub|mul|fma\.rn|div\.rn|cvt\.f64\.f32|cvt\.rn\.f64)\S*\.f64\b", re.M)
out = {}
for name, g, opt in (("convnet_adam", tiny_convnet(), gc.optim.Adam(0.01)),
                     ("convnet_sgd", tiny_convnet(), gc.optim.SGD(0.1, momentum=0.9)),
                     ("losses", losses_graph()[0], None),
                     ("custom_ops", custom_graph(), gc.optim.SGD(0.1))):    # user-declared ops: constants in f32
    gg = training_graph(g, opt) if opt is not None else g
    for fuse in (True, False):
        piped = Pipeline("cuda", fuse=fuse)(gg)
        for k, ptx in cb.compile_ptx_group_kernels(piped, {"N": 2}).items():
            out[f"{name}/{fuse}/{k}"] = {"entry": ".entry" in ptx, "sm_90": ".target sm_90" in ptx,
                                         "f64": len(F64.findall(ptx))}
print(json.dumps(out))
"""


for _half in ("sim_a", "sim_b", "sim_c"):
    children.register(_half, children.pytest_child(THIS, f"{_half} and not in_cuda_simulator"), sim=True,
                      driver="test_backend_in_cuda_simulator")
children.register("backend_ptx", [sys.executable, "-c", _PTX_SCRIPT, ROOT], sim=False,
                  driver="test_generated_kernels_compile_to_ptx")


def test_generated_kernels_compile_to_ptx():
    rc, out, err = children.wait("backend_ptx", 600)
    assert rc == 0, f"a CUDA toolkit is installed and a kernel failed to compile to PTX:\n{(out + err)[-4000:]}"
    rep = json.loads(out.strip().splitlines()[-1])
    if "skip" in rep:
        pytest.skip(f"no CUDA toolkit here (numba.cuda or libNVVM cannot be loaded): {rep['skip']}")
    assert len(rep) >= 20, sorted(rep)
    assert any(k.endswith("kernels:copy") for k in rep)
    for k, info in rep.items():
        assert info["entry"] and info["sm_90"], (k, info)
        # float32 kernels do float32 arithmetic only; the dense cross-entropy rows sum in float64 (as the reference)
        assert (info["f64"] > 0) == k.endswith("kernels:xent_dense_rows"), (k, info)


# ================================================================================ graphs and helpers

def tiny_convnet(seed=0):
    """conv(1->2, 3x3, pad 1) relu maxpool 2 [conv_relu_maxpool] -> conv(2->3, 3x3, pad 1) relu [conv_relu]
    -> flatten -> dense 4 -> softmax cross-entropy; 6x6 images."""
    g = gc.Graph("tiny_convnet", seed=seed)
    x = g.input("x", (None, 1, 6, 6))
    y = g.input("y", (None,), "int64")
    h = g.maxpool(g.relu(g.conv(x, g.param("c1.w", (2, 1, 3, 3)), g.param("c1.b", (2,), init="normal"), pad=1)), 2)
    h = g.relu(g.conv(h, g.param("c2.w", (3, 2, 3, 3)), g.param("c2.b", (3,), init="normal"), pad=1))
    logits = g.dense(g.flatten(h), g.param("d.w", (4, 27)), g.param("d.b", (4,), init="normal"), name="logits")
    g.output(g.softmax_cross_entropy(logits, y, name="loss"))
    return g


def losses_graph():
    g = gc.Graph("losses")
    z = g.input("z", (None, 5))
    lab = g.input("lab", (None,), "int64")
    oh = g.input("oh", (None, 5))
    t = g.input("t", (None, 5))
    u = g.input("u", (None, 3, 4))
    p = g.softmax(z, axis=1, name="p")
    terms = [g.softmax_cross_entropy(z, lab, name="sce_int"), g.softmax_cross_entropy(z, oh, name="sce_dense"),
             g.cross_entropy(p, lab, name="ce_int"), g.cross_entropy(p, oh, name="ce_dense"),
             g.mse(z, t, name="mse"), g.bce_with_sigmoid(z, t, name="bce")]
    sm1 = g.softmax(u, axis=1, name="sm_axis1")
    c = g.const(np.random.default_rng(3).standard_normal((3, 4)))
    terms.append(g.sum(g.mul(sm1, c)))
    total = terms[0]
    for tt in terms[1:]:
        total = g.add(total, tt)
    g.output(*[tt.name for tt in terms[:6]], "sm_axis1", g.identity(total, name="total"))
    rng = np.random.default_rng(0)
    labels = np.array([1, 4])
    feeds = {"z": rng.standard_normal((2, 5)).astype(np.float32), "lab": labels,
             "oh": np.eye(5, dtype=np.float32)[[2, 0]], "t": rng.uniform(0.1, 0.9, (2, 5)).astype(np.float32),
             "u": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    return g, feeds


def _feeds(g, n=2, seed=0, positive=()):
    rng = np.random.default_rng(seed)
    f = {}
    for name in g.inputs:
        shape, dt = g.nx.nodes[name]["shape"], g.nx.nodes[name]["dtype"]
        s = tuple(n if isinstance(d, str) else d for d in shape)
        if dt.startswith("int"):
            f[name] = rng.integers(0, 3, s)
        else:
            v = rng.standard_normal(s)
            f[name] = (np.abs(v) + 0.5 if name in positive else v).astype(np.float32)
    return f


def _close(a, b, what, dtype=None):
    """a == b to the precision of `dtype` (default: b's): float32 (RTOL, ATOL); float64 at float64
    precision (1e-10 relative), so a kernel that rounds a float64 graph through float32 fails."""
    dtype = np.dtype(np.asarray(b).dtype if dtype is None else dtype)
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (RTOL, ATOL)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol,
                               err_msg=what)


def check_run(g, feeds, fuse=(True, False), outputs=None, training=False, fallbacks=()):
    ref = gc.compile(g).run(feeds, outputs=outputs, training=training)
    exes = []
    for fz in fuse:
        exe = gc.compile(g, backend="cuda", fuse=fz)
        got = exe.run(feeds, outputs=outputs, training=training)
        assert set(got) == set(ref)
        for k in ref:
            _close(got[k], ref[k], f"{g.name} fuse={fz}: {k}")
        assert exe.fallbacks() == sorted(fallbacks), exe.fallbacks()     # everything else on the device
        exes.append(exe)
    return exes


def check_exact(g, feeds, want=None, fuse=(True, False)):
    """Every output of the cuda backend == the reference's (tie-heavy integer data: tests/tie_graphs.py),
    and == the hand-checked values `want`; everything on the device."""
    ref = gc.compile(g).run(feeds)
    for k, v in (want or {}).items():
        assert_exact(ref[k], v, f"reference {g.name}: {k}")
    exes = []
    for fz in fuse:
        exe = gc.compile(g, backend="cuda", fuse=fz)
        got = exe.run(feeds)
        assert set(got) == set(ref)
        for k in ref:
            assert_exact(got[k], ref[k], f"{g.name} fuse={fz}: {k}")
        assert exe.fallbacks() == [], exe.fallbacks()
        exes.append(exe)
    return exes


def with_grads(g, outs, wrt, seed=1):
    """g plus the loss sum_k sum(out_k * c_k) (c_k fixed random constants) and its gradients."""
    rng = np.random.default_rng(seed)
    total = None
    for o in outs:
        shape = g.nx.nodes[o]["shape"]
        cs = tuple(1 if isinstance(d, str) else d for d in shape)     # broadcast over the batch dim
        term = g.sum(g.mul(g[o], g.const(rng.standard_normal(cs))))
        total = term if total is None else g.add(total, term)
    g.output(g.identity(total, name="the_loss"))
    return gc.grad(g, wrt=wrt, loss="the_loss")


def _kinds(exe):
    g = exe.graph
    return sorted(g.nx.nodes[n]["attrs"]["pattern"] for n in g.nx if g.nx.nodes[n]["op"] == "fused")


# ============================== op families (test names carry the simulator child, sim_a or sim_b, that runs them)

@needs_cuda
def test_sim_a_elementwise_ops_broadcasting_and_grads():
    g = gc.Graph("ew")
    x = g.input("x", (None, 3, 4))
    p = g.input("p", (None, 3, 4))
    b1 = g.param("b1", (4,), init="normal")
    b2 = g.param("b2", (3, 1), init="normal")
    s = g.param("s", value=np.float32(0.7))
    outs = [g.relu(x), g.neg(x), g.exp(x), g.log(p), g.sqrt(p), g.sigmoid(x), g.tanh(x), g.add(x, b1),
            g.mul(x, b2), g.sub(x, s), g.div(x, p), g.max(x, b1), g.gt(x, b2), g.copy(g.identity(x)),
            g.mul(g.add(g.mul(x, 2.0), 1.0), g.sigmoid(p))]          # a chain with constants
    g.output(*outs)
    feeds = _feeds(g, positive=("p",))
    exes = check_run(g, feeds)
    assert "elementwise" in _kinds(exes[0]) and not _kinds(exes[1])
    gg = with_grads(g, [o.name for o in outs if o.op != "gt"], ["x", "p", "b1", "b2", "s"])
    check_run(gg, feeds, fuse=(True,))


@needs_cuda
def test_sim_a_shape_ops_and_reductions_with_grads():
    g = gc.Graph("shapes")
    x = g.input("x", (None, 3, 4, 5))
    long = g.input("long", (None, 2, 1100))
    b = g.param("b", (4, 1), init="normal")
    outs = [g.sum(long, axes=(0, 2)),                      # a long reduction: split, then a second pass
            g.transpose(x, (0, 2, 3, 1)), g.slice(g.concat([x, g.mul(x, 2.0)], axis=1), axis=1, start=2, stop=5),
            g.crop2d(g.pad2d(x, (1, 0, 2, 1), value=0.5), (0, 1, 1, 2)), g.reshape(x, (None, 60)),
            g.sum(x, axes=(0, 2, 3)), g.mean(x, axes=(1, 3), keepdims=True), g.sum(x, axes=(0, 2)),
            g.sum(x), g.mean(x, axes=(3,)), g.expand_like(b, x)]
    g.output(*outs)
    feeds = _feeds(g)
    check_run(g, feeds, fuse=(False,))
    gg = with_grads(g, [o.name for o in outs], ["x", "b"])
    check_run(gg, feeds, fuse=(True,))
    ops = {gg.nx.nodes[n]["op"] for n in gg.nx}
    assert {"unslice", "broadcast_like", "sum_to"} <= ops, ops


@needs_cuda
def test_sim_b_padded_max_pool_one_kernel():
    """maxpool(pad=...) (pad2d(-inf) + maxpool) runs as the pad_maxpool pattern at inference: one pool over
    the unpadded input, windows clipped at its edges, exactly the reference's values (NaN and -inf too) and
    the unfused kernels'; on the device."""
    g = gc.Graph("padpool")
    x = g.input("x", (None, 2, 7, 6))
    g.output(g.maxpool(x, 3, 2, pad=1, ceil_mode=True, name="a"), g.maxpool(x, (3, 2), (2, 1), pad=(1, 0), name="b"))
    feeds = _feeds(g)
    feeds["x"][0, 0, 0, 0], feeds["x"][1, 1, 6, 5], feeds["x"][1, 0, 3, 3] = np.nan, -np.inf, np.nan
    ref = gc.compile(g).run(feeds)
    fused, unfused = (gc.compile(g, backend="cuda", fuse=fz) for fz in (True, False))
    assert _kinds(fused) == ["pad_maxpool", "pad_maxpool"] and _kinds(unfused) == [], _kinds(fused)
    got, want = fused.run(feeds), unfused.run(feeds)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)      # (NaN where the reference has NaN)
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert fused.fallbacks() == [], fused.fallbacks()


@needs_cuda
def test_sim_a_pooling_ops_routes_and_grads():
    g = gc.Graph("pools")
    x = g.input("x", (None, 2, 7, 7))
    x2 = g.input("x2", (None, 2, 7, 7))
    dy = g.input("dy", (None, 2, 3, 3))
    r = g.relu(x)
    route = g.add_node("maxpool_argmax", (r,), {"size": (2, 2), "stride": (2, 2), "relu": True}, name="route")
    outs = [g.maxpool(x, 3, stride=2), g.avgpool(x, 3, stride=2), g.avgpool(x, 2, stride=1), g.global_avgpool(x),
            g.maxpool_gather(x, x2, (3, 3), (2, 2))]
    g.output(*outs, route,
             g.add_node("route_scatter", (dy, route), {"in_hw": (7, 7), "size": (2, 2), "stride": (2, 2)},
                        name="scatter"),
             g.add_node("maxpool_argmax", (x,), {"size": (3, 3), "stride": (2, 2), "relu": False}, name="route_x"))
    feeds = _feeds(g)
    check_run(g, feeds, fuse=(False,))
    gg = with_grads(g, [o.name for o in outs], ["x", "x2"])
    check_run(gg, feeds, fuse=(True,))
    ops = {gg.nx.nodes[n]["op"] for n in gg.nx}
    assert {"maxpool_route", "avgpool_spread", "global_avgpool_spread"} <= ops, ops
    # a pool window the fused conv-ReLU-pool kernel does not take (5x5 > 16 positions): conv, pool, fix-ups
    h = gc.Graph("bigpool")
    x = h.input("x", (None, 1, 6, 6))
    y = h.maxpool(h.relu(h.conv(x, h.param("w", (2, 1, 1, 1)), h.param("b", (2,), init="normal"))), 5, stride=1)
    h.output(y)
    hh = with_grads(h, [y.name], ["w", "b"])
    exe = check_run(hh, _feeds(h), fuse=(True,))[0]
    assert "conv_relu_maxpool" in _kinds(exe) and "route_relu" in _kinds(exe), _kinds(exe)


@needs_cuda
def test_sim_a_losses_softmax_and_grads():
    g, feeds = losses_graph()
    check_run(g, feeds, fuse=(False,))
    gg = gc.grad(g, wrt=["z", "oh", "t", "u"], loss="total")
    ops = {gg.nx.nodes[n]["op"] for n in gg.nx}
    assert {"softmax_ce_grad", "cross_entropy_grad", "mse_grad", "bce_grad"} <= ops, ops
    check_run(gg, feeds, fuse=(True,))


@needs_cuda
def test_sim_b_data_parallel_step_on_one_rank_is_the_plain_step():
    """The allreduce nodes run on the host (no kernel): with one rank they are copies, so the data-parallel
    step (several buckets) equals the plain step exactly (tests/test_mpi.py runs two ranks on the CPU). The
    tiny conv net's 189 parameters in buckets of 200-300 bytes: three buckets (lenet5 took 4 minutes here)."""
    from graphc import distributed as dist
    g = tiny_convnet()
    feeds = _feeds(g)
    plain = gc.compile(g, "cuda", optimizer=gc.optim.SGD(0.1))
    dp = gc.compile(g, "cuda", optimizer=gc.optim.SGD(0.1),
                    distributed=dist.DataParallel(dist.LocalComm(), first_bucket_mb=0.0002, bucket_mb=0.0003))
    assert sum(d["op"] == "allreduce" for _, d in dp.graph.nx.nodes(data=True)) >= 3
    assert plain.step(feeds) == dp.step(feeds)
    for k in plain.state:
        np.testing.assert_array_equal(plain.state[k], dp.state[k])


@needs_cuda
def test_sim_b_float64_matmul_and_grads_keep_float64_precision():
    g = gc.Graph("mm", dtype="float64")
    a = g.input("a", (None, 3), "float64")
    a2 = g.input("a2", (None, 4), "float64")
    w = g.param("w", (4, 3), init="normal")
    m = g.param("m", (3, 5), init="normal")
    outs = [g.matmul(a, w, trans_b=True), g.matmul(a, m), g.matmul(a, a2, trans_a=True),
            g.matmul(w, a2, trans_a=True, trans_b=True)]
    g.output(*outs)
    feeds = {k: v.astype(np.float64) for k, v in _feeds(g).items()}
    check_run(g, feeds, fuse=(False,))
    gg = with_grads(g, [o.name for o in outs], ["a", "a2", "w", "m"])
    exes = check_run(gg, feeds, fuse=(True,))
    assert exes[0].dtype == np.float64


@needs_cuda
def test_sim_a_dropout_mask_matches_reference_draws():
    g = gc.Graph("drop")
    x = g.input("x", (None, 16))
    g.output(g.dropout(x, 0.5, seed=3, name="y"))
    feeds = _feeds(g)
    for training in (True, False):
        # unfused: the mask's host draws, uploaded (inference: a device fill); fused (the dropout pattern):
        # a device copy at inference, the same uploaded mask and a product kernel in training
        check_run(g, feeds, fuse=(False,), training=training, fallbacks=["y.mask"])
        exe, = check_run(g, feeds, fuse=(True,), training=training)
        assert [d["attrs"]["pattern"] for _, d in exe.graph.nx.nodes(data=True) if d["op"] == "fused"] == ["dropout"]


@needs_cuda
def test_sim_a_kernel_table_covers_every_op():
    from graphc import ops as optable
    from graphc.backends import cuda as cb
    from graphc.backends import registry
    table = dict(cb.kernel_table())
    for op, d in optable.OPS.items():
        if d.source or op == "fused":
            continue
        assert op in table, op
    # the collectives run on the host by design (MPI reduces host buffers); every other op has a kernel
    assert {op for op, k in table.items() if k == registry.FALLBACK} == {"allreduce", "allreduce_wait"}
    assert {"fused:conv_relu", "fused:conv_relu_maxpool", "fused:route_relu", "fused:elementwise"} <= set(table)


@needs_cuda
def test_sim_b_elementwise_op_with_attribute_reaches_the_kernel():
    """A throwaway elementwise op whose scalar expression names an attribute ({alpha}): the generated
    kernel gets the node's value as a constant, fused into a group and alone."""
    from graphc import ops as optable
    from graphc.ops.elementwise import _infer
    name = "leaky_test_op"
    optable.register(optable.OpDef(
        name, _infer, lambda ins, a, ctx: np.where(ins[0] > 0, ins[0], a["alpha"] * ins[0]).astype(ins[0].dtype),
        scalar="a0 if a0 > 0 else {alpha} * a0", attrs={"alpha": 0.01}))
    try:
        g = gc.Graph("leaky")
        x = g.input("x", (None, 3, 4))
        h = g.add_node(name, (g.add(x, g.param("b", (4,), init="normal")),), {"alpha": 0.25}, name="h")
        g.output(g.mul(h, g.scalar(2.0), name="y"))
        check_run(g, _feeds(g))
    finally:
        del optable.OPS[name]


# ================================= ties, exact zeros and plateaus, compared exactly (tests/tie_graphs.py)

@needs_cuda
def test_sim_a_maxpool_backward_ties_go_to_first_max():
    check_exact(*pool_ties())                    # overlapping 3s2 and 2s1 windows, 2s2, pools of relu(x)
    check_exact(*plateau_pool())


@needs_cuda
def test_sim_a_relu_and_max_ties_forward_and_grads_exact():
    check_exact(*relu_max_ties())
    check_exact(*plateau_max())


@needs_cuda
def test_sim_b_maxpool_argmax_route_ties_go_to_first_max():
    check_exact(*route_ties(), fuse=(False,))    # also route_scatter, maxpool_route, maxpool_gather
    check_exact(*plateau_route(), fuse=(False,))


@needs_cuda
def test_sim_b_fused_conv_relu_maxpool_saves_first_max_route_on_ties():
    # overlapping windows; fused only (unfused, the pool kernels are those of the max-pool test above)
    fused, = check_exact(*conv_pool_ties(pools=("p_3s2", "p_2s1"), c_in=1), fuse=(True,))
    kinds = _kinds(fused)
    assert kinds.count("conv_relu_maxpool") == 2 and kinds.count("route_relu") == 2, kinds


# ======================================================================== fused patterns and training

_CONVNET_FEEDS = {"x": np.random.default_rng(5).standard_normal((2, 1, 6, 6)).astype(np.float32),
                  "y": np.array([1, 3])}


@needs_cuda
def test_sim_a_convnet_forward_and_conv_grads_stride2():
    g = tiny_convnet()
    exes = check_run(g, _CONVNET_FEEDS)
    assert _kinds(exes[0]) == ["conv_relu", "conv_relu_maxpool"], _kinds(exes[0])
    f3 = _feeds(g, n=3, seed=4)                   # another batch size: a second binding of its own
    _close(exes[0].run(f3)["loss"], gc.compile(g).run(f3)["loss"], "batch 3")
    assert len(exes[0]._bindings) == 2
    # strided, asymmetrically padded conv: conv_dx (rows past the last window get no gradient), conv_dw
    h = gc.Graph("conv_s2")
    x = h.input("x", (None, 2, 7, 6))
    c = h.conv(x, h.param("w", (3, 2, 3, 2)), h.param("b", (3,), init="normal"), stride=2, pads=(1, 0, 0, 1))
    h.output(c)
    hh = with_grads(h, [c.name], ["x", "w", "b"])
    check_run(hh, _feeds(h), fuse=(False,))


def _check_train(g, mk_opt, steps, fuse, feeds, ref=None):
    ref = ref or gc.compile(g, optimizer=mk_opt())
    ref_losses = [ref.step(feeds) for _ in range(steps)]
    exe = gc.compile(g, backend="cuda", optimizer=mk_opt(), fuse=fuse)
    losses = [exe.step(feeds) for _ in range(steps)]
    _close(losses, ref_losses, f"{g.name} fuse={fuse}: losses", g.dtype)
    for k in ref.state:
        _close(exe.state[k], ref.state[k], f"{g.name} fuse={fuse}: state {k}")
    assert exe.fallbacks() == []
    return exe


@pytest.fixture(scope="module")
def sgd_pair():
    """The tiny conv net with SGD + momentum, fused, after 2 steps checked against the reference: (cuda
    executable, reference executable). test_sim_b_state_* goes on stepping both."""
    mk = lambda: gc.optim.SGD(0.1, momentum=0.9)  # noqa: E731
    ref = gc.compile(tiny_convnet(), optimizer=mk())
    return _check_train(tiny_convnet(), mk, 2, True, _CONVNET_FEEDS, ref=ref), ref


@needs_cuda
def test_sim_b_convnet_sgd_momentum_fused_patterns(sgd_pair):
    exe, _ = sgd_pair
    kinds = _kinds(exe)
    assert {"conv_relu_maxpool", "route_relu", "elementwise"} <= set(kinds), kinds
    g = exe.graph
    fused = [g.nx.nodes[n]["attrs"] for n in g.nx if g.nx.nodes[n]["op"] == "fused"]
    assert any(a["pattern"] == "conv_relu_maxpool" and a.get("saves") == ("route",) for a in fused)
    # the update of a parameter and of its velocity: one kernel writing both into the states in place
    upd = [a for a in fused if a["pattern"] == "elementwise" and len(a["results"]) == 2]
    assert upd and sum(g.memory_plan.kind.get(n) == "state" for n in g.updates.values()) == len(g.updates)


@needs_cuda
def test_sim_b_convnet_adam_fused_and_sgd_unfused():
    _check_train(tiny_convnet(), lambda: gc.optim.Adam(0.01), 2, True, _CONVNET_FEEDS)
    _check_train(tiny_convnet(), lambda: gc.optim.SGD(0.1), 1, False, _CONVNET_FEEDS)


@needs_cuda
def test_sim_b_seed_cnn_sgd_step_gives_seed_notes_values():
    g = models.seed_cnn()
    feeds = {"x": models.SEED_X, "labels": models.SEED_LABELS}
    ref = gc.compile(g, optimizer=gc.optim.SGD(0.5))
    exe = gc.compile(g, backend="cuda", optimizer=gc.optim.SGD(0.5))
    _close(exe.step(feeds), ref.step(feeds), "seed_cnn loss", g.dtype)          # float64
    p = exe.params
    np.testing.assert_allclose(p["conv.w"].ravel(), [0.7731, -0.0269, -0.0269, 0.7731], atol=1e-4)
    np.testing.assert_allclose(p["conv.b"], [-0.1538], atol=1e-4)
    for k, v in ref.params.items():
        _close(p[k], v, f"seed_cnn {k}")


@needs_cuda
def test_sim_b_state_stays_on_device_between_steps(sgd_pair):
    """A step uploads the feeds and downloads the loss, nothing else; state moves only on request."""
    from numba import cuda
    exe, ref = sgd_pair                          # bound and compiled by its first steps
    arr_cls = type(cuda.device_array(1))
    counts = {"h2d": 0, "d2d": 0, "d2h": 0}
    orig_to_dev, orig_to_host = arr_cls.copy_to_device, arr_cls.copy_to_host

    def to_dev(self, ary, *a, **k):
        counts["d2d" if isinstance(ary, arr_cls) else "h2d"] += 1
        return orig_to_dev(self, ary, *a, **k)

    def to_host(self, *a, **k):
        counts["d2h"] += 1
        return orig_to_host(self, *a, **k)

    def no_alloc(*a, **k):
        raise AssertionError("device allocation during a bound step")

    mp = pytest.MonkeyPatch()
    mp.setattr(arr_cls, "copy_to_device", to_dev)
    mp.setattr(arr_cls, "copy_to_host", to_host)
    mp.setattr(cuda, "to_device", no_alloc)
    mp.setattr(cuda, "device_array", no_alloc)
    try:
        loss = exe.step(_CONVNET_FEEDS)
    finally:
        mp.undo()
    assert counts == {"h2d": 2, "d2d": 0, "d2h": 1}, counts       # x and y up, the loss down
    _close(loss, ref.step(_CONVNET_FEEDS), "third step's loss", np.float32)
    for k in ref.state:
        _close(exe.state[k], ref.state[k], f"third step: state {k}")
    _close(exe.run(_CONVNET_FEEDS)["loss"], ref.run(_CONVNET_FEEDS)["loss"], "run() of a training executable")
    # host changes reach the device: learning rate 0 and no velocity leave the parameters unchanged
    sd = exe.state_dict()
    exe.state["optim/lr"][...] = 0.0
    for k in list(exe.state):
        if k.startswith("optim/v/"):
            exe.state[k] = np.zeros(exe.state[k].shape)
    exe.step(_CONVNET_FEEDS)
    for k, v in exe.params.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    exe.load_state_dict(sd)
    assert exe.step_count == 3
    for k, v in exe.state_dict().items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


# ====================================================== ops and patterns declared outside graphc

@needs_cuda
def test_sim_a_custom_elementwise_ops_fused_with_grads():
    """Ops declared in user code (tests/test_custom_ops.py: a slope and a weight as attributes) run inside
    generated elementwise kernels with their attribute values as constants: training steps as the
    reference's, forward and backward on the device."""
    sys.path.insert(0, os.path.dirname(THIS))
    from test_custom_ops import custom_graph, declare_ops
    declare_ops()
    g = custom_graph()
    feeds = _feeds(g, n=3)
    exe = _check_train(g, lambda: gc.optim.SGD(0.1), 2, True, feeds)
    bodies = [[b["op"] for b in exe.graph.nx.nodes[n]["attrs"]["body"]] for n in exe.graph.nx
              if exe.graph.nx.nodes[n]["op"] == "fused"]
    assert any("t_leaky" in b and "t_lerp" in b for b in bodies), bodies
    check_run(g, feeds, fuse=(True, False))


@needs_cuda
def test_sim_b_pattern_without_a_cuda_lowering_runs_on_the_host():
    """A fusion pattern declared only in a test (tests/test_fuse_patterns.py) has no cuda lowering: its
    group runs its body with the reference ops on the host, and training matches the reference."""
    sys.path.insert(0, os.path.dirname(THIS))
    from graphc.passes import patterns as P
    from test_fuse_patterns import _strided_net, _stride2
    extra = P.Chain("conv_relu_strided", roles=(P.Role("conv", "conv", guard=_stride2), P.Role("act", "relu")),
                    prepare=P.relu_masks_on_outputs)
    mp = pytest.MonkeyPatch()
    mp.setattr(P, "PATTERNS", [P.CONV_RELU_MAXPOOL, extra, P.CONV_RELU, P.ELEMENTWISE])
    try:
        g = _strided_net()
        feeds = {"x": np.random.default_rng(0).standard_normal((2, 2, 8, 8)).astype(np.float32), "y": np.array([0, 2])}
        ref = gc.compile(g, optimizer=gc.optim.SGD(0.1))
        exe = gc.compile(g, backend="cuda", optimizer=gc.optim.SGD(0.1))
        _close([exe.step(feeds) for _ in range(2)], [ref.step(feeds) for _ in range(2)], "losses")
        for k in ref.state:
            _close(exe.state[k], ref.state[k], f"state {k}")
        assert "conv_relu_strided" in _kinds(exe)
        assert exe.fallbacks() == ["c1.relu"]            # the unknown group, and nothing else
    finally:
        mp.undo()


@needs_cuda
def test_sim_a_cnn_op_set_matches_reference():
    """Batch norm (both modes, running statistics), grouped/dilated conv, LRN, attribute elementwise ops,
    ceil-mode/padded pools, reflect padding, global max pool: forward, a training run and an SGD step.
    Every op runs on the device (no fallbacks)."""
    rng = np.random.default_rng(7)
    g = gc.Graph("cnn_ops")
    x = g.input("x", (None, 2, 6, 6))
    h = g.conv(x, g.param("w", value=rng.standard_normal((4, 1, 3, 3)) * 0.4), pad=2, dilation=2, groups=2)
    h = gc.nn.batchnorm2d(g, h, "bn")
    h = g.lrn(g.leaky_relu(h, 0.1), 3, 0.1, 0.75, 2.0)
    h = g.hardswish(g.clip(g.maxpool(h, 3, 2, pad=1, ceil_mode=True), -1.0, 2.0))
    h = g.avgpool(g.pad2d(h, 1, mode="reflect"), 2, 2, pad=1, count_include_pad=False)
    z = g.concat([g.global_maxpool(h), g.global_avgpool(g.silu(h))], axis=1)
    g.output(g.softmax_cross_entropy(g.dense(z, g.param("fc", value=rng.standard_normal((3, 8)))), g.input(
        "y", (None,), dtype="int64"), name="loss"))
    feeds = {"x": rng.standard_normal((2, 2, 6, 6)).astype(np.float32), "y": np.array([0, 2])}
    allowed = set()
    ref, exe = gc.compile(g), gc.compile(g, backend="cuda")
    for training in (False, True):
        _close(exe.run(feeds, training=training)["loss"], ref.run(feeds, training=training)["loss"], "loss")
    _close(exe.state["bn.running_var"], ref.state["bn.running_var"], "running var after a training run")
    r, t = gc.compile(g, optimizer=gc.optim.SGD(0.1, momentum=0.9)), \
        gc.compile(g, backend="cuda", optimizer=gc.optim.SGD(0.1, momentum=0.9))
    _close(t.step(feeds), r.step(feeds), "loss", np.float32)     # step returns a Python float
    for k, v in r.state.items():
        _close(t.state[k], v, k)
    ops = {t.graph.nx.nodes[n]["op"] for n in t.fallbacks()} | {exe.graph.nx.nodes[n]["op"] for n in exe.fallbacks()}
    assert ops <= allowed, ops

def norm_net(dtype):
    """Batch norm on 4-D and 2-D values, LRN, reflect and edge padding, global max pool, a batched matmul
    (batch dims on both sides, transposed), plain convs: every op has a CUDA kernel."""
    rng = np.random.default_rng(11)
    g = gc.Graph("norm_net", dtype=dtype)
    x = g.input("x", (None, 2, 5, 5))
    h = g.conv(x, g.param("w", value=rng.standard_normal((4, 2, 3, 3)) * 0.4), pad=1)
    h = g.lrn(gc.nn.batchnorm2d(g, h, "bn"), 3, 0.1, 0.75, 2.0)
    h = g.pad2d(g.pad2d(h, (1, 0, 2, 1), mode="reflect"), 1, mode="edge")
    z = g.reshape(g.global_maxpool(h), (x.shape[0], 2, 2, 1))
    z = g.matmul(z, g.param("mm", value=rng.standard_normal((2, 3, 1))), trans_b=True)       # (N, 2, 2, 3)
    z = gc.nn.batchnorm2d(g, g.reshape(z, (x.shape[0], 12)), "bn1d")
    g.output(g.softmax_cross_entropy(g.dense(z, g.param("fc", value=rng.standard_normal((3, 12)))), g.input(
        "y", (None,), dtype="int64"), name="loss"))
    return g, {"x": rng.standard_normal((3, 2, 5, 5)), "y": np.array([0, 2, 1])}


@needs_cuda
def test_sim_b_folded_batch_norm_follows_the_state():
    """conv -> BN -> ReLU -> pool folded (one fused kernel); the folded weights are recomputed when the
    device state changes: an edited exe.state entry, load_state_dict, a training-mode run (on the
    unfolded twin, which shares the device state)."""
    rng = np.random.default_rng(3)
    g = gc.Graph("fold")
    x = g.input("x", (None, 1, 6, 6))
    h = g.maxpool(g.relu(gc.nn.batchnorm2d(g, g.conv(x, g.param("w", (2, 1, 3, 3)), pad=1), "bn")), 2)
    g.output(g.softmax_cross_entropy(g.dense(g.flatten(h), g.param("fc", (3, 18))), g.input(
        "y", (None,), dtype="int64"), name="loss"))
    feeds = {"x": rng.standard_normal((2, 1, 6, 6)).astype(np.float32), "y": np.array([0, 2])}
    ref, exe = gc.compile(g), gc.compile(g, backend="cuda")
    assert exe.folded_bn() == ("bn",) and "conv_relu_maxpool" in _kinds(exe)

    def same(what):
        _close(exe.run(feeds)["loss"], ref.run(feeds)["loss"], what)
    same("folded")
    for e in (exe, ref):
        e.state["bn.running_var"][...] = [0.25, 4.0]          # edited in place on the host copy
    same("edited running variance")
    for _ in range(2):
        _close(exe.run(feeds, training=True)["loss"], ref.run(feeds, training=True)["loss"], "training run")
    _close(exe.state["bn.running_mean"], ref.state["bn.running_mean"], "running mean")
    same("after training runs")
    d = ref.state_dict()
    d["w"] = d["w"] * -1.5
    ref.load_state_dict(d)
    exe.load_state_dict(d)
    same("after load_state_dict")
    assert exe.fallbacks() == []


@needs_cuda
def test_sim_c_norm_ops_float64_on_the_device():
    g, feeds = norm_net("float64")
    ref, exe = gc.compile(g), gc.compile(g, backend="cuda")
    for training in (False, True, False):
        _close(exe.run(feeds, training=training)["loss"], ref.run(feeds, training=training)["loss"], "loss")
    for k in ("bn.running_mean", "bn1d.running_var"):
        _close(exe.state[k], ref.state[k], k)
    mk = lambda: gc.optim.SGD(0.1, momentum=0.9)  # noqa: E731
    _check_train(g, mk, 2, True, feeds)        # (asserts no fallbacks)
    assert exe.fallbacks() == []


# ============================== NaN/inf semantics, label guards, 0-d values (issue 11; cases: tests/nan_graphs.py)

def _nan_check(g, cases, fuse=True, what=""):
    ref, exe = gc.compile(g), gc.compile(g, backend="cuda", fuse=fuse)
    for case, feeds in cases.items():
        f = nan_graphs.feeds_for(g, feeds)
        with np.errstate(all="ignore"):
            nan_graphs.compare(exe.run(f), ref.run(f), f"{what}{g.name} {case}")


@needs_cuda
def test_sim_c_nan_losses_elementwise_and_pools_follow_the_reference():
    """Saturated softmaxes (0 * -inf), inf/NaN logits, float32-overflowing squares (float64 terms and
    sums), float32 elementwise chains, max pools holding NaN (NaN, routed to the first NaN)."""
    for which in nan_graphs.LOSSES:
        _nan_check(nan_graphs.loss_graph(which), nan_graphs.loss_feeds())
    _nan_check(nan_graphs.elementwise(), {"specials": nan_graphs.elementwise_feeds()})
    for fuse in (True, False):
        _nan_check(nan_graphs.pools(), {"specials": nan_graphs.pool_feeds()}, fuse)


@needs_cuda
def test_sim_b_nan_conv_relu_pool_forward_and_step_follow_the_reference():
    """The fused conv-ReLU-pool kernel (NaN windows; masked routes: dy * 0) forward and an SGD step."""
    g, sgd = nan_graphs.cnn(), gc.optim.SGD(0.1)
    cases = {k: v for k, v in nan_graphs.cnn_feeds().items() if k in ("nan_first", "nan_mid", "all_neginf")}
    _nan_check(g, cases)
    rt, ct = gc.compile(g, optimizer=sgd), gc.compile(g, backend="cuda", optimizer=sgd)
    init = rt.state_dict()
    for case, feeds in cases.items():
        rt.load_state_dict(init)
        ct.load_state_dict(init)
        with np.errstate(all="ignore"):
            want = {"loss": np.float32(rt.step(feeds)), **rt.params}
        nan_graphs.compare({"loss": np.float32(ct.step(feeds)), **ct.params}, want, f"step {case}")


@needs_cuda
def test_sim_b_computed_labels_are_refused_and_zero_d_values_stay_zero_d():
    """Labels computed in the graph (a concat of fed labels with const ones): the kernels never index with
    an out-of-range one and set a flag, read after them: a FeedError, before any update of a training
    step; in range, the reference's value. #16: 0-d consts, inputs and results keep the reference's shapes."""
    from graphc.errors import FeedError
    for loss in ("sce", "ce"):
        g = gc.Graph(f"computed_{loss}")
        z = g.mul(g.input("z", (4, 3)), g.param("w", value=np.ones(3)))
        lab = g.concat([g.input("y", (2,), dtype="int64"), g.const(np.array([1, 2]))], axis=0)
        g.output((g.softmax_cross_entropy if loss == "sce" else g.cross_entropy)(
            z if loss == "sce" else g.softmax(z, axis=1), lab, name="L"))
        bad = {"z": np.zeros((4, 3), np.float32), "y": np.array([0, 7])}
        for opt in (None, gc.optim.SGD(0.5)):
            exe = gc.compile(g, backend="cuda", optimizer=opt)
            with pytest.raises(FeedError, match=r"label 7 at position 1 is outside 0\.\.2"):
                exe.step(bad) if opt else exe.run(bad)
            assert np.array_equal(exe.params["w"], np.ones(3, np.float32))
            ok = {**bad, "y": np.array([0, 2])}
            _close(exe.step(ok) if opt else exe.run(ok)["L"], gc.compile(g).run(ok)["L"], f"{loss} in range",
                   np.float32)
    g = gc.Graph("zero_d")
    s, a = g.input("s", ()), g.input("a", (None, 3))
    g.output(g.identity(g.const(np.asarray(1.0)), name="c"), g.mul(s, a, name="sa"), g.sum(a, name="tot"),
             g.relu(s, name="rs"))
    feeds = {"s": np.asarray(3.0, np.float32), "a": np.ones((2, 3), np.float32)}
    shapes = [{k: v.shape for k, v in gc.compile(g, backend=b).run(feeds).items()} for b in ("reference", "cuda")]
    assert shapes[0] == shapes[1] == {"c": (), "sa": (2, 3), "tot": (), "rs": ()}, shapes


def grouped_convnet():
    """1x1 conv + ReLU6 [conv_clip] -> depthwise 3x3 stride 2 + ReLU [conv_relu] -> grouped dilated conv +
    ReLU + max pool [conv_relu_maxpool] -> depthwise conv with two filters per channel -> dense."""
    rng = np.random.default_rng(11)
    g = gc.Graph("grouped")
    x = g.input("x", (None, 2, 6, 6))

    def p(name, shape):
        return g.param(name, value=(rng.standard_normal(shape) * 0.5).astype(np.float32))
    h = g.clip(g.conv(x, p("e.w", (4, 2, 1, 1)), p("e.b", (4,))), 0.0, 6.0)
    h = g.relu(g.conv(h, p("d.w", (4, 1, 3, 3)), p("d.b", (4,)), stride=2, pad=1, groups=4))
    h = g.maxpool(g.relu(g.conv(h, p("g.w", (2, 2, 2, 2)), None, pad=2, dilation=2, groups=2)), 2)
    h = g.conv(h, p("m.w", (4, 1, 2, 1)), p("m.b", (4,)), groups=2, dilation=(1, 1), pad=(1, 0))
    logits = g.dense(g.flatten(h), p("fc", (3, 24)), name="logits")
    g.output(g.softmax_cross_entropy(logits, g.input("y", (None,), "int64"), name="loss"))
    return g


@needs_cuda
def test_sim_a_grouped_dilated_depthwise_convs_fused_with_grads():
    g = grouped_convnet()
    feeds = {"x": np.random.default_rng(12).standard_normal((2, 2, 6, 6)).astype(np.float32), "y": np.array([2, 0])}
    exes = check_run(g, feeds)
    assert _kinds(exes[0]) == ["conv_clip", "conv_relu", "conv_relu_maxpool"], _kinds(exes[0])
    exe = _check_train(g, lambda: gc.optim.SGD(0.1, momentum=0.9), 1, True, feeds)
    ops = {exe.graph.nx.nodes[n]["op"] for n in exe.graph.nx}
    assert {"conv_dx", "conv_dw"} <= ops and "conv_relu" in _kinds(exe)
