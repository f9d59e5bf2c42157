"""The `graphc` command line: every verb's --help, one-line errors with a non-zero status, summary's
parameter counts, render's files, and bench/train forwarding their options."""
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import graphc as gc
from graphc import cli, models


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Fontconfig")]
    assert len(lines) == 1, err
    assert lines[0].startswith("graphc: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("verb", [None, "summary", "render", "bench", "train"])
def test_help_exits_zero_with_an_example(capsys, verb):
    argv = ["--help"] if verb is None else [verb, "--help"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: graphc" in out and "example" in out
    if verb:
        assert f"graphc {verb} " in out.split("example", 1)[1]


def test_summary_parameter_counts(capsys):
    # the published totals, counted by hand layer by layer in test_zoo.py (conv K*K*C*N + N weights,
    # dense in*out + out): LeNet-5 61,706 and AlexNet 62,378,344
    rc, out, _ = run(capsys, "summary", "lenet5")
    assert rc == 0 and "total trainable parameters: 61,706" in out
    rc, out, _ = run(capsys, "summary", "alexnet")
    assert rc == 0 and "total trainable parameters: 62,378,344" in out


def test_summary_columns_and_backward_totals(capsys):
    rc, out, _ = run(capsys, "summary", "lenet5")
    assert rc == 0
    head = next(line for line in out.splitlines() if line.startswith("node"))
    assert head.split() == ["node", "op", "output", "shape", "params", "param", "bytes", "MACs", "activations"]
    row = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ("c1", "c3")}
    # by hand: c1 6 filters 1x5x5 at 28x28 = 117,600 MACs, 156 params = 624 bytes, 6*28*28 float32 out = 18.8 KB
    assert re.search(r"156\s+624 B\s+117,600\s+18\.8 KB$", row["c1"]) and re.search(r"240,000", row["c3"])
    assert "parameter bytes: 246,824 (246.8 KB)" in out and "MACs per image: 416,520" in out
    rc, out, _ = run(capsys, "summary", "lenet5", "--backward")
    assert rc == 0 and "total trainable parameters: 61,706" in out            # not 123,240: no double count
    assert "MACs per image: 1,131,960" in out                 # + dL/dW and dL/dX of each conv and dense


def test_unknown_model_is_one_line(capsys):
    rc, out, err = run(capsys, "summary", "no_such_net")
    assert rc != 0 and out == ""
    line = one_error_line(err)
    assert "unknown model 'no_such_net'" in line and "lenet5" in line


@pytest.mark.parametrize("argv, needle", [
    (["render", "lenet5", "--bogus"], "unrecognized arguments: --bogus"),
    (["render", "lenet5", "--format", "bmp"], "invalid choice: 'bmp'"),
    (["render"], "required: MODEL"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "choose a command"),
    (["summary", "missing_file.py:build"], "not found"),
    (["render", "lenet5", "-o", "picture.bmp"], "cannot tell the output format"),
])
def test_bad_arguments_are_one_line(capsys, argv, needle):
    rc, _, err = run(capsys, *argv)
    assert rc != 0
    assert needle in one_error_line(err)


def test_model_from_a_file(capsys, tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import graphc as gc\n"
                 "def build():\n"
                 "    g = gc.Graph('tiny')\n"
                 "    x = g.input('x', (None, 3))\n"
                 "    w = g.param('w', (2, 3))\n"
                 "    g.output(g.sum(g.matmul(x, w, trans_b=True), name='loss'))\n"
                 "    return g\n"
                 "def broken():\n"
                 "    raise ValueError('oops')\n")
    rc, out, _ = run(capsys, "summary", f"{f}:build")
    assert rc == 0 and "total trainable parameters: 6" in out
    rc, _, err = run(capsys, "summary", f"{f}:broken")
    assert rc != 0 and "cannot load model" in one_error_line(err) and "ValueError: oops" in err
    from graphc.errors import GraphError
    with pytest.raises(GraphError) as e:                        # --debug: the traceback, chained
        cli.main(["summary", f"{f}:broken", "--debug"])
    assert isinstance(e.value.__cause__, ValueError)


def test_render_writes_files(capsys, tmp_path):
    out_file = tmp_path / "seed.dot"
    rc, out, _ = run(capsys, "render", "seed_cnn", "--backward", "--values", "-o", str(out_file))
    b = gc.grad(models.load("seed_cnn"))
    drawn = len(b.nx) - len(b.op_nodes("identity")) - sum(       # identities elided, scalar constants inlined
        1 for n in b.op_nodes("const") if np.asarray(b.nx.nodes[n]["attrs"]["value"]).size == 1)
    assert rc == 0 and out.startswith("values: the course's worked example, label 0\n")
    # 41 edges: the graph's edges less those into and out of the elided and inlined nodes, each
    # elided identity bridged by one edge that keeps its rule
    assert out.splitlines()[1].startswith(f"wrote {out_file} ({drawn} nodes, 41 edges"), out
    text = out_file.read_text()
    assert "0.2539" in text and "0.5077" in text and "dir=back" in text
    rc, _, _ = run(capsys, "render", "lenet5", "--format", "json", "-o", str(tmp_path / "l.json"))
    assert rc == 0 and (tmp_path / "l.json").read_text().startswith("{")
    rc, out, _ = run(capsys, "render", "vgg16", "--backward", "--collapse", "--format", "dot",
                     "-o", str(tmp_path / "v.dot"))
    assert rc == 0 and "conv3_[1-3] x3" in (tmp_path / "v.dot").read_text()


def test_render_default_output_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run(capsys, "render", "seed_cnn", "--backward-only", "--format", "dot")
    assert rc == 0 and (tmp_path / "seed_cnn_backward_only.dot").exists()


def test_render_png_for_real(capsys, tmp_path):
    pytest.importorskip("pygraphviz")
    rc, out, _ = run(capsys, "render", "lenet5", "--backward", "-o", str(tmp_path / "l.png"))
    assert rc == 0 and (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_render_fused_values(capsys, tmp_path):
    rc, out, _ = run(capsys, "render", "lenet5", "--fused", "--values", "--format", "dot",
                     "-o", str(tmp_path / "f.dot"))
    assert rc == 0
    assert "fused kernels" in out and "subgraph" in (tmp_path / "f.dot").read_text()


def test_bench_forwards_options(capsys, monkeypatch):
    seen = {}
    fake = types.ModuleType("graphc.bench")
    fake.run_bench = lambda model, **kw: seen.update(model=model, **kw)
    monkeypatch.setitem(sys.modules, "graphc.bench", fake)
    rc, _, _ = run(capsys, "bench", "mnist_convnet", "--train", "--batch", "128", "--compare", "torch,jax",
                   "--json", "out.json", "--no-fuse", "--no-fold-bn", "--backend", "reference", "--tune")
    assert rc == 0
    assert seen == dict(model="mnist_convnet", backend="reference", batch=128, train=True, fuse=False,
                        compare=["torch", "jax"], json_path="out.json", repeats=None, measure_compile=True,
                        fold_bn=False, tune=True)
    seen.clear()
    rc, _, _ = run(capsys, "bench", "lenet5", "--repeats", "7", "--no-compile-times")
    assert rc == 0 and seen["repeats"] == 7 and seen["measure_compile"] is False
    rc, _, err = run(capsys, "bench", "lenet5", "--repeats", "0")
    assert rc == 1 and "--repeats must be at least 1" in err


def test_bench_report_prints_tables_not_dicts():
    from graphc.bench import report
    r = {"model": "lenet5", "backend": "numba", "batch": 64, "mode": "train", "fuse": True, "step_ms": 2.5,
         "kernels": [{"name": "k", "ops": ["conv"], "shapes": "(64, 1, 28, 28)", "ms": 1.0, "gflops": 3.0,
                      "share": 0.4}], "kernel_count": 1, "kernel_ms_sum": 1.0,
         "compile_s": {"cold": None, "warm": None, "this_process": {"compile_s": 0.1, "first_step_s": 0.2}},
         "roofline_gflops": None, "threads": {"used": 2, "measured_ms": {2: 61.04035099997418, 1: 3.0512}},
         "machine": {"loadavg": (1.5, 2.25, 3.0)}, "compare": {}}
    text = report(r)
    assert "{" not in text and "}" not in text
    assert "threads: 2 (measured per run: 2 threads 61.04 ms, 1 thread 3.05 ms); load average 1.50 2.25 3.00" in text


def test_bench_missing_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphc.bench", None)      # import graphc.bench -> ImportError
    rc, _, err = run(capsys, "bench", "lenet5")
    assert rc != 0 and "not available" in one_error_line(err)


def test_train_forwards_options(capsys, monkeypatch):
    train = pytest.importorskip("graphc.train")
    seen = {}
    if hasattr(train, "main_from_args"):
        monkeypatch.setattr(train, "main_from_args", lambda args: seen.update(vars(args)) or 0)
    else:
        monkeypatch.setattr(train, "train", lambda **kw: seen.update(kw))
    rc, _, _ = run(capsys, "train", "lenet5", "--epochs", "3", "--batch", "32", "--optimizer", "momentum",
                   "--lr", "0.05", "--backend", "reference", "--seed", "7", "--save", "a.npz")
    assert rc == 0
    assert {k: seen[k] for k in ("model", "epochs", "batch", "optimizer", "lr", "backend", "seed", "save",
                                 "resume")} == dict(model="lenet5", epochs=3, batch=32, optimizer="momentum",
                                                    lr=0.05, backend="reference", seed=7, save="a.npz",
                                                    resume=None)


def test_train_graph_errors_are_one_line(capsys, monkeypatch):
    train = pytest.importorskip("graphc.train")
    from graphc.errors import CheckpointError

    def boom(*a, **k):
        raise CheckpointError("checkpoint x.npz holds c1.w of shape (6, 1, 5, 5), the model needs (8, 1, 5, 5)")
    monkeypatch.setattr(train, "train", boom)
    rc, _, err = run(capsys, "train", "lenet5", "--resume", "x.npz")
    assert rc != 0 and "checkpoint x.npz" in one_error_line(err)


def test_console_script_exit_status():
    """The real process: exit status and stderr, no traceback."""
    # the script installed beside this interpreter (a `graphc` elsewhere on PATH may be another install's)
    exe = shutil.which("graphc", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "graphc.cli"]
    p = subprocess.run(cmd + ["summary", "nope"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert one_error_line(p.stderr).startswith("graphc: error: unknown model 'nope'")
    p = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "summary" in p.stdout and "render" in p.stdout
