"""graphc bench's peers and suite machinery (graphc/bench_peers.py, graphc/bench_suite.py) on tiny models:
the onnxruntime peer agreeing with graphc on an .onnx model with placeholder weights made random, peak
memory reported for every step process, the suite on a fake table (JSON, markdown, --only, --table) and
the command line. No timing is asserted: speed is measured by `graphc bench`, not by tests."""
import io
import json
import os

import numpy as np
import pytest

from graphc import bench_peers, bench_suite, cli
from graphc.bench_suite import SUITE, Entry
from graphc.errors import GraphError


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------ the table

def test_suite_is_the_issues_table():
    got = {(e.model, e.batch, e.train) for e in SUITE}
    assert got == {("mnist_convnet", 128, True), ("mnist_convnet", 1, False), ("lenet5", 64, True),
                   ("alexnet", 8, False), ("vgg16", 2, False), ("resnet18", 16, True), ("resnet18", 1, False),
                   ("mobilenet_v2", 1, False)}
    assert len({e.name for e in SUITE}) == len(SUITE)
    from graphc import models
    assert all(e.model in models.names() for e in SUITE)
    assert set(bench_suite.PEERS) == {"torch", "torch_compile", "onnxruntime"}


def test_only_keeps_the_tables_order_and_names_unknown_entries():
    picked = bench_suite.select(SUITE, "resnet18-train-b16, mnist_convnet-infer-b1")
    assert [e.name for e in picked] == ["mnist_convnet-infer-b1", "resnet18-train-b16"]
    with pytest.raises(GraphError, match="no suite entry 'resnet19'.*mobilenet_v2-infer-b1"):
        bench_suite.select(SUITE, ["resnet19"])


def test_repeats_adapt_to_the_step_time():
    assert bench_peers.repeats_for(0.001, 50, 10.0) == 50       # fast steps: the cap
    assert bench_peers.repeats_for(1.0, 50, 10.0) == 10         # slow ones: the budget
    assert bench_peers.repeats_for(100.0, 50, 10.0) == 3        # never fewer than 3
    assert bench_peers.repeats_for(100.0, 50, None) == 50       # no budget: as asked


def test_timed_steps_stop_at_the_budget():
    import time
    r = bench_peers.measure(lambda: time.sleep(0.05), 100, warmup=1, budget_s=0.2)
    assert 3 <= r["repeats"] <= 5             # each step takes at least 0.05 s: over 0.2 s after 4


_PEAK_SCRIPT = r"""
import json, mmap
from graphc.bench_peers import measure

def pages(mb):                    # fresh pages from the kernel (not memory malloc kept)
    m = mmap.mmap(-1, mb << 20)
    m.write(b"\1" * (mb << 20))
    return m

pages(300).close()                # an earlier peak, 300 MB above what the steps will hold
held = []
r = measure(lambda: held.append(pages(16)), 4, warmup=1)
print(json.dumps(dict(r, held=len(held))))
"""


def test_measure_reports_the_peak_of_the_timed_steps():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=120)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["repeats"] == 4 and r["held"] == 5 and r["step_ms"] >= 0
    assert r["rss_peak_mb"] > 300                            # the earlier peak, before the steps
    if r["rss_step_mb"] is not None:                         # Linux: the peak reset before the timed steps
        assert 5 * 16 < r["rss_step_mb"] < r["rss_peak_mb"] - 150, r


def test_a_child_reports_its_own_peak_not_its_parents():
    big = np.ones(50_000_000)                  # 400 MB resident in this process
    res = bench_peers.run_child({"peer": "graphc", "model": "mlp", "batch": 2, "train": False, "repeats": 3,
                                 "backend": "reference", "fuse": True})
    assert bench_peers.maxrss_mb() > 400 and 0 < res["rss_peak_mb"] < bench_peers.maxrss_mb() - 300, res
    del big


def test_a_capped_child_is_reported_not_timed():
    spec = {"peer": "torch_compile", "model": "mlp", "batch": 2, "train": False, "repeats": 3}
    res = bench_peers.run_child(spec, timeout=0.01)
    assert "step_ms" not in res and "over the 0.01 s cap" in res["error"]


# ------------------------------------------------------------------------------ side by side

class _FakePeer:
    """A stand-in for a PeerProcess: each block takes a fixed time per step and is logged; it can end
    after a number of blocks (run returns None, as a peer whose process ended)."""

    def __init__(self, name, step_s, log, blocks=None):
        self.name, self.step_s, self.log, self.left = name, step_s, log, blocks

    def run(self, n):
        if self.left == 0:
            return None
        self.left = None if self.left is None else self.left - 1
        self.log.append((self.name, n))
        return [self.step_s] * n


def test_side_by_side_takes_turns_and_splits_each_ones_steps_over_the_rounds():
    log = []
    peers = {"a": _FakePeer("a", 0.001, log), "b": _FakePeer("b", 1.0, log, blocks=2)}
    times = bench_peers.side_by_side(lambda: log.append(("graphc", None)), 0.001, peers, repeats=20, budget_s=4.0,
                                     rounds=4)
    assert len(times["graphc"]) == 4 and all(len(b) == 5 for b in times["graphc"])    # 20 steps, 4 rounds
    assert [len(b) for b in times["a"]] == [5] * 4
    assert [len(b) for b in times["b"]] == [1, 1]          # 1 s steps: 4 in the budget, 1 a round; then it ended
    # the turns (graphc's block: its 6 steps in a row, the first untimed), the order reversed every other round
    turns = [w for i, (w, _) in enumerate(log) if i == 0 or log[i - 1][0] != w or w != "graphc"]
    assert turns == ["graphc", "a", "b", "b", "a", "graphc", "a", "a", "graphc"]   # graphc ends round 2, starts round 3
    assert sum(w == "graphc" for w, _ in log) == 4 * 6


def test_a_peer_process_is_timed_in_blocks_when_asked():
    pytest.importorskip("torch")
    spec = {"peer": "torch_eager", "model": "mlp", "batch": 2, "train": False, "repeats": 3}
    p = bench_peers.PeerProcess(spec, timeout=300)
    assert p.result is None and p.step_s > 0                       # warmed up, waiting
    first, second = p.run(2), p.run(3)
    assert len(first) == 2 and len(second) == 3 and all(t > 0 for t in first + second)
    res = p.finish()
    assert res["repeats"] == 5 and res["step_ms"] > 0 and res["rss_peak_mb"] > 0
    assert p.proc.poll() is not None and p.run(1) is None         # ended: no more blocks


def test_a_peer_process_that_fails_or_runs_past_its_cap_says_why():
    p = bench_peers.PeerProcess({"peer": "torch_eager", "model": "no_such_model", "batch": 2, "train": False,
                                 "repeats": 3}, timeout=300)
    assert p.step_s is None and p.run(1) is None and "error" in p.finish()
    p = bench_peers.PeerProcess({"peer": "torch_compile", "model": "mlp", "batch": 2, "train": False, "repeats": 3},
                                timeout=0.01)
    assert p.step_s is None and "over the 0.01 s cap" in p.finish()["error"] and p.proc.poll() is not None


# ------------------------------------------------------------------- a fake table, end to end

@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "suite.json"
    table = (Entry("mlp-infer-b2", "mlp", 2, False), Entry("mlp-train-b2", "mlp", 2, True))
    out = io.StringIO()
    doc = bench_suite.run_suite(table, json_path=str(path), backend="reference", peers=("torch", "onnxruntime"),
                                budget_s=0.2, repeats=5, measure_compile=False, out=out)
    return doc, path, out.getvalue()


def test_suite_writes_every_entry_to_json(suite_run):
    doc, path, _ = suite_run
    saved = json.loads(path.read_text())
    assert [e["name"] for e in saved["entries"]] == ["mlp-infer-b2", "mlp-train-b2"]
    m = saved["machine"]
    assert m["cpus"] >= 1 and m["date"] and "cpu_model" in m and "cpu_llvm" in m
    # the BLAS kernel sets graphc's GEMMs ran (an environment forcing OpenBLAS's AVX2 kernels halves them)
    assert "SciPy's openblas" in m["blas"] and m["openblas_coretype"] == os.environ.get("OPENBLAS_CORETYPE")
    for e in saved["entries"]:
        g = e["graphc"]
        assert g["step_ms"] > 0 and g["compile_cold_s"] is None        # probes off here
        assert g["rss_peak_mb"] > 0                                     # graphc's own step process
        assert e["detail"]["compare"] and e["command"].startswith("graphc bench mlp --batch 2")
    infer, train = saved["entries"]
    assert "inference only" in train["peers"]["onnxruntime"]["note"]
    ort = infer["peers"]["onnxruntime"]
    if "note" not in ort:                                               # onnxruntime installed
        assert ort["agrees"] is True and ort["rss_peak_mb"] > 0
    for e in saved["entries"]:
        torch = e["peers"]["torch_eager"]
        if "note" not in torch:
            assert torch["agrees"] is True and torch["rss_peak_mb"] > 0
            # timed side by side with graphc: the ratio is of the two medians over the same rounds
            side = e["detail"]["side_by_side"]
            assert side["rounds"] == bench_peers.ROUNDS and len(side["block_ms"]["torch_eager"]) == side["rounds"]
            assert e["graphc"]["step_ms"] == side["step_ms"] == e["detail"]["step_ms"]
            assert torch["ratio"] == pytest.approx(side["step_ms"] / torch["step_ms"])
            assert torch["repeats"] >= side["rounds"] and side["repeats"] >= side["rounds"]


def test_suite_prints_a_line_per_entry_and_the_markdown_table(suite_run, capsys):
    doc, path, printed = suite_run
    assert "[1/2] mlp-infer-b2" in printed and "[2/2] mlp-train-b2" in printed
    table = bench_suite.markdown(doc)
    assert table in printed
    lines = table.splitlines()
    assert lines[0].startswith("Measured ") and "load average" in lines[0] and "cores of" in lines[0]
    assert lines[2].startswith("| workload | graphc (numba) | torch eager | onnxruntime |")
    assert lines[4].startswith("| `graphc bench mlp --batch 2` |")
    assert lines[5].startswith("| `graphc bench mlp --batch 2 --train` |") and "train n/a" in lines[5]
    rc, out, _ = run(capsys, "bench", "--table", str(path))
    assert rc == 0 and out.strip() == table


def test_markdown_marks_caps_and_disagreement():
    doc = {"backend": "numba", "loadavg_start": [0.5, 0, 0], "loadavg_end": [0.7, 0, 0],
           "machine": {"cpus": 2, "cpu_model": "AMD EPYC", "cpu_llvm": "znver5", "date": "2030-01-02T03:04:05",
                       "versions": {}, "blas": "SciPy's openblas 0.3.30 Haswell", "openblas_coretype": "Haswell"},
           "entries": [{"name": "a", "command": "graphc bench a --batch 1", "graphc": {"step_ms": 2.0},
                        "peers": {"torch_eager": {"step_ms": 4.0, "ratio": 0.5, "agrees": False, "rss_step_mb": 300},
                                  "torch_compile": {"agrees": None, "note": "over the 600 s cap (compile included)"}}},
                       {"name": "b", "error": "model 'b' not found"}]}
    table = bench_suite.markdown(doc)
    assert "2030-01-02" in table and "AMD EPYC" in table and "znver5" in table and "0.50 / 0.70" in table
    assert "BLAS: SciPy's openblas 0.3.30 Haswell, OPENBLAS_CORETYPE=Haswell)" in table
    row = table.splitlines()[4]
    assert "4.0 ms (0.50x) (disagrees!)" in row and "over the cap" in row and "n/a / 300" in row
    assert "| b | error: model 'b' not found |" in table


# ------------------------------------------------------------------------- the command line

def test_cli_suite_forwards_and_refuses_what_does_not_apply(capsys, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench_suite, "run_suite", lambda **kw: seen.update(kw))
    rc, _, _ = run(capsys, "bench", "--suite", "--only", "lenet5-train-b64", "--timeout", "60", "--json", "s.json")
    assert rc == 0 and seen["only"] == "lenet5-train-b64" and seen["timeout"] == 60 and seen["json_path"] == "s.json"
    assert seen["peers"] == bench_suite.PEERS
    for argv, code, words in ((["bench"], 2, "give MODEL, or --suite"),
                              (["bench", "lenet5", "--only", "x"], 2, "--only picks entries of --suite"),
                              (["bench", "--suite", "lenet5"], 1, "drop MODEL"),
                              (["bench", "--table", str(tmp_path / "none.json")], 1, "cannot read a suite JSON"),
                              (["bench", "lenet5", "--random-weights", "3"], 1, "applies to an .onnx MODEL")):
        rc, _, err = run(capsys, *argv)
        assert rc == code and words in err and len(err.strip().splitlines()) == 1, err
    import graphc.bench
    monkeypatch.setattr(graphc.bench, "run_bench", lambda model, **kw: seen.update(model=model, **kw))
    rc, _, _ = run(capsys, "bench", "m.onnx", "--compare", "onnxruntime,torch", "--random-weights", "3", "--timeout", "5")
    assert rc == 0 and seen["model"] == "m.onnx" and seen["random_weights"] == 3 and seen["timeout"] == 5
    assert seen["compare"] == ["onnxruntime", "torch"]


# --------------------------------------------------- an .onnx model with placeholder weights

def _placeholder_model(path):
    """conv -> relu -> global average pool -> flatten -> gemm -> softmax, every weight ConstantOfShape
    0.02 (as the onnx wheel's light/ models), written to `path`."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.02])
    shapes = {"w": [8, 3, 3, 3], "b": [8], "fw": [5, 8], "fb": [5]}
    nodes = [helper.make_node("ConstantOfShape", [f"{k}_shape"], [k], value=fill) for k in shapes]
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["prob"])]
    inits = [numpy_helper.from_array(np.array(s, np.int64), f"{k}_shape") for k, s in shapes.items()]
    m = helper.make_model(helper.make_graph(nodes, "placeholders",
                                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                                            [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])], inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(path))
    return m


def test_randomize_replaces_placeholders_with_seeded_weights(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper
    from graphc.onnx.random_weights import constant_weights, randomize
    m = _placeholder_model(tmp_path / "p.onnx")
    assert len(constant_weights(m)) == 4
    a, n = randomize(onnx.load(str(tmp_path / "p.onnx")), 1)
    b, _ = randomize(onnx.load(str(tmp_path / "p.onnx")), 1)
    c, n_all = randomize(onnx.load(str(tmp_path / "p.onnx")), 2, initializers=True)
    vals = [{t.name: numpy_helper.to_array(t) for t in x.graph.initializer} for x in (a, b, c)]
    assert n == n_all == 4 and not constant_weights(a)
    assert np.std(vals[0]["w"]) > 0 and all(np.array_equal(vals[0][k], vals[1][k]) for k in vals[0])
    assert not np.array_equal(vals[0]["w"], vals[2]["w"])
    onnx.checker.check_model(a, full_check=True)


def test_random_weights_seed_applies_to_onnx_models_only(tmp_path):
    pytest.importorskip("onnx")
    _placeholder_model(tmp_path / "p.onnx")
    src = bench_peers.ModelSource(str(tmp_path / "p.onnx"), 7)
    assert src.spec != str(tmp_path / "p.onnx") and src.note.startswith("seeded random weights (seed 7) in 4")
    src.close()
    for bad in (-1, 1.5, True):
        with pytest.raises(GraphError, match="takes a seed"):
            bench_peers.ModelSource(str(tmp_path / "p.onnx"), bad)
    with pytest.raises(GraphError, match="applies to an .onnx MODEL"):
        bench_peers.ModelSource("lenet5", 0)
    assert bench_peers.ModelSource("lenet5").spec == "lenet5"


def test_bench_onnx_model_with_onnxruntime_and_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from graphc.bench import report, run_bench
    path = tmp_path / "p.onnx"
    _placeholder_model(path)
    r = run_bench(str(path), backend="reference", batch=2, compare=["onnxruntime", "torch"], repeats=3,
                  measure_compile=False, roofline=False, quiet=True)
    assert r["weights"].startswith("seeded random weights (seed 0) in 4 tensors")     # placeholders: by itself
    ort = r["compare"]["onnxruntime"]
    assert ort["same_outputs"] is True and ort["threads"] >= 1, ort
    assert ort["rss_peak_mb"] > 0 and r["graphc_process"]["rss_peak_mb"] > 0
    torch = r["compare"]["torch_eager"]
    assert torch.get("same_model") is True or "absent" in torch, torch
    text = report(r)
    assert "same outputs as graphc" in text and "peak RSS over the timed steps" in text
    assert "weights: seeded random weights (seed 0)" in text
