"""The ONNX standard's conformance material as graphc cases, and the generated conformance table.

Node cases: `onnx.backend.test.loader.load_model_tests(kind="node")` (built in memory by the onnx wheel).
A case is in scope when its op (the op of its single node; for a function body, "_expanded", the op of its
sibling case) has a mapping in graphc.onnx. Each in-scope case ends as

    pass          graphc's outputs equal the case's (rtol 1e-3, atol 1e-5 relative to the output's scale)
    unsupported   gc.onnx.load raised UnsupportedOnnx: the reason names the op, attribute or value
    fail          anything else (a wrong value, another error): a bug

Inputs that the op needs as constants (a Reshape's shape, a Clip's bounds, a Pad's pads: the positions in
the mapping table's `const_inputs`) are bound at import time with gc.onnx.load(..., constants=...), as a
compiler with static shapes does.

    python tests/onnx_cases.py            # rewrites tests/onnx_conformance.md from a reference-backend run
"""
from __future__ import annotations

import collections
import functools
import os
import sys
import warnings

import numpy as np

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onnx_conformance.md")
RTOL, ATOL = 1e-3, 1e-5


@functools.lru_cache(maxsize=None)
def _all_node_cases():
    from onnx.backend.test.loader import load_model_tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(load_model_tests(kind="node"))


def _table():
    from graphc.onnx import importer  # noqa: F401
    import graphc.onnx.map_conv  # noqa: F401
    import graphc.onnx.map_elementwise  # noqa: F401
    import graphc.onnx.map_linalg  # noqa: F401
    import graphc.onnx.map_tensor  # noqa: F401
    from graphc.onnx.registry import OPS
    return OPS


def case_op(case, by_name):
    """The op a case exercises: its single node's, or (function bodies) its sibling case's + " (expanded)"."""
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    sib = by_name.get(case.name.split("_expanded")[0])
    op = sib.model.graph.node[0].op_type if sib is not None and len(sib.model.graph.node) == 1 \
        else "+".join(sorted({n.op_type for n in nodes}))
    return op + (" (expanded)" if "_expanded" in case.name else "")


@functools.lru_cache(maxsize=None)
def node_cases():
    """{case name: (op, case)} for every in-scope node case, in the wheel's order."""
    ops = _table()
    cases = _all_node_cases()
    by_name = {c.name: c for c in cases}
    out = {}
    for c in cases:
        op = case_op(c, by_name)
        if op.split(" ")[0] in ops:
            out[c.name] = (op, c)
    return out


def constant_inputs(model):
    """Names of graph inputs that sit where an op needs an import-time constant."""
    ops = _table()
    inputs = {v.name for v in model.graph.input}
    names = set()
    for n in model.graph.node:
        spec = ops.get(n.op_type)
        for i in spec.const_inputs if spec else ():
            if i < len(n.input) and n.input[i] in inputs:
                names.add(n.input[i])
    return names


def close(got, want):
    """rtol 1e-3 and an atol of 1e-5 times the output's magnitude (float32 sums reorder freely)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False, f"shape {got.shape} != {want.shape}"
    if want.dtype.kind not in "fc":
        ok = np.array_equal(got.astype(want.dtype), want)
        return ok, "" if ok else "values differ"
    scale = float(np.max(np.abs(want[np.isfinite(want)]), initial=1.0))
    ok = np.allclose(got, want, rtol=RTOL, atol=ATOL * scale, equal_nan=True)
    err = float(np.nanmax(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
    return ok, "" if ok else f"max abs error {err:.3g} (scale {scale:.3g})"


def run_model(model, inputs, outputs, backend="reference"):
    """(status, detail) for one model and its data set; status 'pass', 'unsupported', 'waits' (needs an
    issue-12 op this build lacks) or 'fail'."""
    import graphc as gc
    from graphc.onnx import UnsupportedOnnx
    inputs, outputs = [_array(x) for x in inputs], [_array(x) for x in outputs]
    names = [v.name for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    data = dict(zip(names, inputs))
    bound = constant_inputs(model)
    try:
        g = gc.onnx.load(model, constants={n: data[n] for n in bound if n in data},
                         input_shapes=_dynamic_shapes(model, data))
    except UnsupportedOnnx as e:
        reason = (f"attribute {e.attribute}: " if e.attribute else "") + e.reason
        return ("waits" if e.waits_for else "unsupported"), reason
    except Exception as e:   # noqa: BLE001 - reported as a failure
        return "fail", f"{type(e).__name__}: {e}"
    try:
        exe = gc.compile(g, backend=backend)
        feeds = {n: data[n] for n in g.inputs}
        got = exe.run(feeds)
    except Exception as e:   # noqa: BLE001
        return "fail", f"{type(e).__name__}: {e}"
    for o, want in zip(model.graph.output, outputs):
        ok, why = close(got[o.name], want)
        if not ok:
            return "fail", f"output {o.name!r}: {why}"
    return "pass", ""


def _dynamic_shapes(model, data):
    """The data's shapes for inputs declared with dynamic dims beyond the first: a static-shape compiler
    binds them at import time."""
    out = {}
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        if v.name in data and any(not d.HasField("dim_value") for d in list(dims)[1:]):
            out[v.name] = np.shape(data[v.name])
    return out


def _array(x):
    from onnx import TensorProto, numpy_helper
    return numpy_helper.to_array(x) if isinstance(x, TensorProto) else x


def run_case(name, backend="reference"):
    """Runs a node case ("test_relu") or a folder case ("pytorch-converted/test_ReLU")."""
    if "/" in name:
        return run_folder_case(name, backend)
    op, case = node_cases()[name]
    inputs, outputs = case.data_sets[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_model(case.model, inputs, outputs, backend)


def all_cases():
    """{case name: op} for the node cases and the folder cases in scope."""
    out = {name: op for name, (op, _) in node_cases().items()}
    out.update({name: op for name, (op, _, _) in folder_cases().items()})
    return out


HEADER = """# ONNX conformance of graphc's importer (reference backend)

Generated by `python tests/onnx_cases.py` from the onnx wheel's node cases
(`onnx.backend.test.loader.load_model_tests(kind="node")`) and its pytorch-converted, pytorch-operator and
simple folders; tests/test_onnx_conformance.py checks that this file matches a fresh run. Statuses: pass
(rtol 1e-3, atol 1e-5 x the output's magnitude), unsupported (graphc cannot express the op, attribute or
dtype: the reason says which), waits (needs an op of the CNN op set, issue 12, that this build lacks),
fail (a bug).
"""


def _counts(results, ops, title):
    per_op = collections.OrderedDict()
    for name, (status, _) in results.items():
        per_op.setdefault(ops[name], collections.Counter())[status] += 1
    total = collections.Counter(s for s, _ in results.values())
    lines = [f"## {title}", "",
             f"{len(results)} cases of {len(per_op)} ops: {total['pass']} pass, {total['unsupported']} unsupported, "
             f"{total['waits']} wait for issue 12, {total['fail']} fail.", "",
             "| op | cases | pass | unsupported | waits (issue 12) | fail |", "|---|---|---|---|---|---|"]
    for op in sorted(per_op):
        c = per_op[op]
        lines.append(f"| {op} | {sum(c.values())} | {c['pass']} | {c['unsupported']} | {c['waits']} | {c['fail']} |")
    return lines + [""]


def conformance_table(results):
    """Markdown: counts per op (pass / unsupported / waits / fail) and every case that does not pass,
    with its reason."""
    ops = all_cases()
    nodes = {n: r for n, r in results.items() if "/" not in n}
    folders = {n: r for n, r in results.items() if "/" in n}
    lines = HEADER.splitlines() + [""]
    lines += _counts(nodes, ops, "Node cases (an op graphc maps)")
    lines += _counts(folders, ops, "pytorch-converted, pytorch-operator, simple (a model with an op graphc maps)")
    lines += ["## Cases that do not pass", "", "| case | op | status | reason |", "|---|---|---|---|"]
    for name, (status, detail) in results.items():
        if status != "pass":
            reason = " ".join(detail.split()).replace("|", "\\|")
            lines.append(f"| {name} | {ops[name]} | {status} | {reason} |")
    return "\n".join(lines) + "\n"


def parse_table(text):
    """{case: (status, reason)} for the listed (non-passing) cases of a committed table."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[2] in ("unsupported", "waits", "fail"):
            out[cells[0]] = (cells[2], cells[3].replace("\\|", "|"))
    return out


FOLDERS = ("pytorch-converted", "pytorch-operator", "simple")


@functools.lru_cache(maxsize=None)
def folder_cases():
    """{folder/case: (model path, [(inputs, outputs)])} for the wheel's pytorch-converted,
    pytorch-operator and simple cases whose ops graphc maps (every node's op, or a constant)."""
    import glob

    import onnx
    from onnx import numpy_helper
    from onnx.backend.test.loader import load_model_tests
    ops = _table()
    out = {}
    for kind in FOLDERS:
        for c in sorted(load_model_tests(kind=kind), key=lambda c: c.name):
            path = os.path.join(c.model_dir, "model.onnx")
            model = onnx.load(path)
            if not any(n.op_type in ops for n in model.graph.node):
                continue
            sets = []
            for d in sorted(glob.glob(os.path.join(c.model_dir, "test_data_set_*"))):
                def read(prefix, d=d):
                    files = sorted(glob.glob(os.path.join(d, f"{prefix}_*.pb")),
                                   key=lambda f: int(f.rsplit("_", 1)[1][:-3]))
                    return [numpy_helper.to_array(onnx.load_tensor(f)) for f in files]
                sets.append((read("input"), read("output")))
            ops_in = sorted({n.op_type for n in model.graph.node})
            out[f"{kind}/{c.name}"] = ("+".join(ops_in), path, sets)
    return out


def run_folder_case(name, backend="reference"):
    import onnx
    _, path, sets = folder_cases()[name]
    model = onnx.load(path)
    result = ("pass", "")
    for inputs, outputs in sets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_model(model, inputs, outputs, backend)
        if result[0] != "pass":
            break
    return result


# --- light/: real architectures, weights made random ----------------------------------------------

LIGHT = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512")


def light_path(name):
    import onnx
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")


def randomized(model, seed=0):
    """The model (changed in place) with every ConstantOfShape weight (all 0.02 in the wheel) replaced by
    a seeded random initializer (graphc.onnx.random_weights), and the logits (the final Softmax's input)
    added as an output."""
    from onnx import helper
    from graphc.onnx.random_weights import randomize
    m, _ = randomize(model, seed)
    outs = {o.name for o in m.graph.output}
    soft = [n for n in m.graph.node if n.op_type == "Softmax" and n.output[0] in outs]
    if soft:
        m.graph.output.append(helper.make_empty_tensor_value_info(soft[0].input[0]))
    return m


def run_light(name, backend="reference", seed=0):
    """{'status', 'detail', 'errors': {output: (max abs error, max |reference|)}} for a light model with
    random weights, graphc (backend) against onnxruntime on one seeded image."""
    import graphc as gc
    from graphc.onnx import UnsupportedOnnx
    from graphc.onnx.peer import run_onnxruntime
    import onnx
    model = randomized(onnx.load(light_path(name)), seed)
    try:
        g = gc.onnx.load(model)
    except UnsupportedOnnx as e:
        return {"status": "waits" if e.waits_for else "unsupported", "detail": str(e), "errors": {}}
    x = np.random.default_rng(seed + 1).standard_normal(g[g.inputs[0]].shape).astype(np.float32)
    outs = [o.name for o in model.graph.output]
    got = gc.compile(g, backend=backend, keep=outs).run({g.inputs[0]: x}, outputs=outs)
    ref = run_onnxruntime(model, {g.inputs[0]: x})["outputs"]
    errors, ok = {}, True
    for o in outs:
        scale = float(np.max(np.abs(ref[o])))
        errors[o] = (float(np.max(np.abs(got[o] - ref[o]))), scale)
        ok &= bool(np.allclose(got[o], ref[o], rtol=1e-3, atol=1e-4 * scale))
    return {"status": "pass" if ok else "fail", "detail": "", "errors": errors}


def run_all(backend="reference"):
    return {name: run_case(name, backend) for name in all_cases()}


def main(argv):
    """python tests/onnx_cases.py               rewrites the table from a reference run
    python tests/onnx_cases.py light [BACKEND] [MODEL ...]   light models against onnxruntime"""
    import time
    if argv[:1] == ["light"]:
        backend = argv[1] if len(argv) > 1 else "reference"
        for name in argv[2:] or LIGHT:
            t0 = time.perf_counter()
            r = run_light(name, backend)
            errs = ", ".join(f"{o}: max abs err {e:.3g} (max |ref| {s:.3g})" for o, (e, s) in r["errors"].items())
            print(f"{name:14s} {backend:9s} {r['status']:11s} {time.perf_counter() - t0:6.1f} s  {errs}{r['detail']}",
                  flush=True)
        return
    res = run_all()
    with open(TABLE_PATH, "w") as f:
        f.write(conformance_table(res))
    print(f"wrote {TABLE_PATH}: {dict(collections.Counter(s for s, _ in res.values()))}")
    for name, (status, detail) in res.items():
        if status == "fail":
            print(f"FAIL {name}: {detail}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
