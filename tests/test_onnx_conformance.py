"""The ONNX standard's own cases through gc.onnx.load: every in-scope node case (one test per mapped op)
and the pytorch-converted, pytorch-operator and simple folders on the reference backend, a seeded sample
on numba, and the committed table tests/onnx_conformance.md checked against a fresh run. The cases are
built when a test runs, not when tests are collected. Cases and table: onnx_cases.py."""
import random

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx_cases as oc  # noqa: E402

NUMBA_SAMPLE = 24


def _run(names, backend="reference"):
    """{name: (status, detail)}; fails listing every wrong case (none may be wrong)."""
    results = {n: oc.run_case(n, backend) for n in names}
    wrong = {n: d for n, (s, d) in results.items() if s == "fail"}
    assert not wrong, "\n".join(f"{n}: {d}" for n, d in wrong.items())
    return results


@pytest.mark.parametrize("op", sorted(oc._table()))
def test_node_cases_of_op(op):
    """Each case of the op (and of its function body, "_expanded") passes or is explained."""
    names = [n for n, (case_op, _) in oc.node_cases().items() if case_op.split(" ")[0] == op]
    if not names:
        pytest.skip(f"the onnx wheel has no node case for {op}")
    results = _run(names)
    waiting = [n for n, (s, _) in results.items() if s == "waits"]
    if waiting and len(waiting) == len(names):
        pytest.skip(f"all {len(names)} cases wait for issue-12 ops: {results[waiting[0]][1]}")


@pytest.mark.parametrize("folder", oc.FOLDERS)
def test_folder_cases(folder):
    _run([n for n in oc.folder_cases() if n.startswith(folder + "/")])


def test_numba_sample():
    """A seeded sample of the cases that pass on reference, on the numba backend."""
    with open(oc.TABLE_PATH) as f:
        listed = oc.parse_table(f.read())
    passing = sorted(n for n in oc.all_cases() if n not in listed)
    sample = random.Random(13).sample(passing, min(NUMBA_SAMPLE, len(passing)))
    results = {n: oc.run_case(n, backend="numba") for n in sample}
    bad = {n: r for n, r in results.items() if r[0] != "pass"}
    assert not bad, bad


def test_committed_table_is_current():
    """tests/onnx_conformance.md equals a fresh reference run (regenerate: python tests/onnx_cases.py).
    A case listed as waiting for an issue-12 op may pass once that op exists; then the table is only
    out of date, which the skip says. Every case that does not pass is listed with its reason."""
    results = oc.run_all()
    with open(oc.TABLE_PATH) as f:
        committed = f.read()
    listed = oc.parse_table(committed)
    assert all(reason for _, reason in listed.values())
    if oc.conformance_table(results) == committed:
        return
    landed = [n for n, (s, _) in results.items() if s == "pass" and listed.get(n, ("",))[0] == "waits"]
    stale = [n for n, (s, d) in results.items()
             if n not in landed and listed.get(n, ("pass", "")) != ((s, " ".join(d.split())) if s != "pass" else
                                                                    ("pass", ""))]
    assert not stale, (f"tests/onnx_conformance.md is out of date for {stale[:5]}: regenerate it with "
                       "`python tests/onnx_cases.py`")
    pytest.skip(f"{len(landed)} cases that waited for issue-12 ops pass now; regenerate "
                "tests/onnx_conformance.md with `python tests/onnx_cases.py`")
