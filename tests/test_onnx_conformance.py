"""The ONNX standard's own cases through gc.onnx.load: every in-scope node case (and the pytorch-converted,
pytorch-operator and simple folders) on the reference backend, a seeded sample on numba, and the
committed table tests/onnx_conformance.md checked against a fresh run. Cases and table: onnx_cases.py."""
import random

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx_cases as oc  # noqa: E402

CASES = sorted(oc.all_cases())
NUMBA_SAMPLE = 24


def _committed():
    with open(oc.TABLE_PATH) as f:
        return oc.parse_table(f.read())


@pytest.mark.parametrize("name", CASES)
def test_case_on_reference(name):
    """Each case passes or is explained (unsupported / waits for an issue-12 op); none is wrong."""
    status, detail = oc.run_case(name)
    assert status != "fail", detail
    if status == "waits":
        pytest.skip(detail)


def _numba_sample():
    listed = _committed()
    passing = [n for n in CASES if n not in listed]
    return sorted(random.Random(13).sample(passing, min(NUMBA_SAMPLE, len(passing))))


@pytest.mark.parametrize("name", _numba_sample())
def test_case_on_numba(name):
    status, detail = oc.run_case(name, backend="numba")
    assert status == "pass", detail


def test_committed_table_is_current():
    """tests/onnx_conformance.md equals a fresh reference run (regenerate: python tests/onnx_cases.py).
    A case listed as waiting for an issue-12 op may pass once that op exists; then the table is only
    out of date, which the skip says."""
    results = oc.run_all()
    with open(oc.TABLE_PATH) as f:
        committed = f.read()
    fresh = oc.conformance_table(results)
    if fresh == committed:
        return
    listed = oc.parse_table(committed)
    landed = [n for n, (s, _) in results.items() if s == "pass" and listed.get(n, ("",))[0] == "waits"]
    others = [n for n, r in results.items() if n not in landed and listed.get(n, ("pass", "")) !=
              ((r[0], " ".join(r[1].split())) if r[0] != "pass" else ("pass", ""))]
    assert not others, (f"tests/onnx_conformance.md is out of date for {others[:5]}: "
                        "regenerate it with `python tests/onnx_cases.py`")
    pytest.skip(f"{len(landed)} cases that waited for issue-12 ops pass now; regenerate "
                "tests/onnx_conformance.md with `python tests/onnx_cases.py`")


def test_table_lists_every_case_and_reason():
    """Nothing is skipped silently: every in-scope case that does not pass is in the table with a reason."""
    listed = _committed()
    assert set(listed) <= set(CASES)
    assert all(reason for _, reason in listed.values())
    with open(oc.TABLE_PATH) as f:
        text = f.read()
    assert f"{len([n for n in CASES if '/' not in n])} cases of" in text
