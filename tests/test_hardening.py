"""Regression tests for the hardening issue's numbered defects (#1-#17): each reproduction from the
issue, now a graphc error with one line (or the right value) instead of a crash, a traceback, a wrong
value or lost data."""
import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphc as gc
from graphc import cli, data
from graphc.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from graphc.errors import CheckpointError, DataError, FeedError


def one_line(e):
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, msg
    return msg


def words_in(msg, *words):
    missing = [w for w in words if w not in msg]
    assert not missing, f"{missing} not in: {msg}"


def classifier(seed=0):
    """x (N, 1, 4, 4) -> conv 2@3x3 -> relu -> flatten -> dense 10 -> softmax cross-entropy on labels."""
    g = gc.Graph("clf", seed=seed)
    x = g.input("x", (None, 1, 4, 4))
    y = g.input("labels", (None,), dtype="int64")
    h = g.relu(g.conv(x, g.param("c.w", (2, 1, 3, 3)), g.param("c.b", (2,), init="uniform")))
    logits = g.dense(g.flatten(h), g.param("d.w", (10, 8)), g.param("d.b", (10,)), name="logits")
    g.output(g.softmax_cross_entropy(logits, y, name="loss"))
    return g


@pytest.fixture(scope="module")
def clf_exes():
    """The classifier compiled for inference and SGD training on both CPU backends (compiled once)."""
    pytest.importorskip("numba")
    g = classifier()
    return {(b, t): gc.compile(g, backend=b, optimizer=gc.optim.SGD(0.1) if t else None)
            for b in ("reference", "numba") for t in (False, True)}


X7 = np.random.default_rng(0).standard_normal((7, 1, 4, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def digits():
    """A tiny random digit dataset (64 train / 32 test images): training runs in a second."""
    rng = np.random.default_rng(1)
    return data.Dataset(rng.integers(0, 256, (64, 28, 28), np.uint8), rng.integers(0, 10, 64),
                        rng.integers(0, 256, (32, 28, 28), np.uint8), rng.integers(0, 10, 32), "digits")


def train(ds, **kw):
    lines = []
    kw = {"backend": "reference", "batch": 16, "progress": False, "optimizer": "sgd", **kw}
    return gc.train.train(kw.pop("model", "mlp"), data=ds, log=lines.append, **kw), lines


def cli_run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Fontconfig")]
    return rc, out, lines


# ------------------------------------------------------------------ 1: labels outside 0..K-1

@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("bad, pos", [(10**9, 6), (10, 6), (-1, 6), (-(2**40), 0)])
def test_01_labels_outside_the_classes_are_a_feed_error(clf_exes, backend, bad, pos):
    exe, trainer = clf_exes[(backend, False)], clf_exes[(backend, True)]
    labels = np.array([1, 2, 3, 4, 5, 6, 7])
    labels[pos] = bad
    before = {k: v.copy() for k, v in trainer.params.items()}
    for call in (lambda: exe.run({"x": X7, "labels": labels}), lambda: trainer.step({"x": X7, "labels": labels})):
        with pytest.raises(FeedError) as e:
            call()
        words_in(one_line(e), "'labels'", str(bad), f"position {pos}", "0..9")
    assert all(np.array_equal(before[k], v) for k, v in trainer.params.items())   # no step happened
    assert np.isfinite(exe.run({"x": X7, "labels": np.arange(7)})["loss"])          # 0..9 still runs


def test_01_labels_of_cross_entropy_are_checked_too():
    g = gc.Graph("ce")
    p = g.softmax(g.input("z", (None, 3)), axis=1)
    g.output(g.cross_entropy(p, g.input("y", (None,), dtype="int32")))
    with pytest.raises(FeedError, match=r"'y': label 3 at position 1 is outside 0\.\.2"):
        gc.compile(g).run({"z": np.zeros((2, 3)), "y": np.array([0, 3], np.int32)})


def test_01_labels_are_checked_before_the_int_cast_and_inside_fused_groups():
    from graphc.executable import class_label_inputs
    from graphc.passes.fuse import make_group
    g = gc.Graph("wrap")
    g.output(g.softmax_cross_entropy(g.input("z", (None, 3)), g.input("y", (None,), dtype="int32"), name="loss"))
    with pytest.raises(FeedError, match="label 4294967297 at position 1"):     # int32 would wrap it to 1
        gc.compile(g).run({"z": np.zeros((2, 3)), "y": np.array([0, 2**32 + 1])})
    fused = g.clone()
    make_group(fused, "test", ["loss"], {"loss": "loss"})   # a pass that fuses the loss keeps the check
    assert fused.nx.nodes["loss"]["op"] == "fused" and class_label_inputs(fused) == {"y": (3, "loss")}


def test_01_constant_labels_are_checked_at_compile():
    g = gc.Graph("constlabels")
    g.output(g.softmax_cross_entropy(g.input("z", (2, 3)), g.const(np.array([0, 5]))))
    with pytest.raises(gc.GraphError, match=r"label 5 at position 1 is outside 0\.\.2") as e:
        gc.compile(g)
    one_line(e)


# ------------------------------------------------------------------ 2: relu/max propagate NaN

def test_02_relu_and_max_follow_numpy_nan_semantics():
    g = gc.Graph("nan")
    a, b = g.input("a", (None,)), g.input("b", (None,))
    g.output(g.relu(a, name="relu"), g.max(a, b, name="max"), g.relu(g.add(a, b), name="fused"))
    A = np.array([np.nan, 1, -1, np.nan, 2, np.inf, -np.inf], np.float32)
    B = np.array([0, np.nan, np.nan, np.nan, 1, 1, 1], np.float32)
    want = {"relu": np.maximum(A, 0), "max": np.maximum(A, B), "fused": np.maximum(A + B, 0)}
    for backend in ("reference", "numba"):
        out = gc.compile(g, backend=backend).run({"a": A, "b": B})
        for k, v in want.items():
            np.testing.assert_array_equal(out[k], v, err_msg=f"{backend} {k}")


def test_02_a_nan_pixel_makes_the_mlp_loss_nan_on_both_backends():
    g = gc.models.mlp()
    x = np.zeros((2, 1, 28, 28), np.float32)
    x[0, 0, 5, 5] = np.nan
    feeds = {"x": x, "labels": np.array([1, 2])}
    losses = [float(gc.compile(g, backend=b).run(feeds)["loss"]) for b in ("reference", "numba")]
    assert all(np.isnan(v) for v in losses), losses


# ------------------------------------------------------------------ 3: a corrupted Numba cache

CACHE_CHILD = textwrap.dedent("""
    import numpy as np, graphc as gc
    g = gc.Graph("cachefault"); a = g.input("a", (None, 4)); g.output(g.relu(g.mul(a, a), name="r"))
    exe = gc.compile(g, backend="numba", progress=None)       # (no "compiling N kernels" line on stderr)
    print("sum", exe.run({"a": np.arange(8.0).reshape(2, 4) - 3})["r"].sum())
""")


def test_03_corrupted_kernel_cache_is_discarded_and_recompiled(tmp_path):
    pytest.importorskip("numba")
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(tmp_path / "cache")}

    def child():
        return subprocess.run([sys.executable, "-c", CACHE_CHILD], env=env, capture_output=True, text=True,
                              timeout=300)
    assert "sum 44.0" in child().stdout                                 # populates the cache
    entries = [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert entries
    for p in entries:          # truncated index files, garbage data files
        p.write_bytes(p.read_bytes()[:10] if p.suffix == ".nbi" else os.urandom(64))
    r = child()
    assert r.returncode == 0 and "sum 44.0" in r.stdout, r.stderr[-2000:]
    assert len([ln for ln in r.stderr.splitlines() if "cache" in ln.lower()]) <= 1    # warned once at most


# ------------------------------------------------------------------ 4: any param name round-trips

def test_04_any_param_name_round_trips_through_a_checkpoint(tmp_path):
    names = ["file", "allow_pickle", "a/b.c", "x\x00y", "état", "state/0", "..", "k" * 300, " "]
    g = gc.Graph("names")
    x = g.input("x", (None, 2))
    out = x
    for i, n in enumerate(names):
        out = g.add(out, g.param(n, value=np.full((2,), float(i))))
    g.output(out)
    exe = gc.compile(g)
    save_checkpoint(tmp_path / "n.npz", exe)
    fresh = gc.compile(g)
    for n in names:
        fresh.state[n] = np.zeros(2, np.float32)
    load_checkpoint(tmp_path / "n.npz", fresh)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(fresh.state[n], np.full((2,), float(i)), err_msg=repr(n))


def test_04_step_and_meta_names_are_reserved():
    g = gc.Graph()
    for reserved in ("__step__", "__meta__"):
        with pytest.raises(gc.GraphError, match="reserved") as e:
            g.param(reserved, (2,))
        one_line(e)


# ------------------------------------------------------------------ 5: a diverging run

def test_05_a_diverging_run_stops_and_keeps_the_finite_checkpoint(digits, tmp_path):
    ck = tmp_path / "run.npz"
    train(digits, epochs=1, save=ck)
    good = ck.read_bytes()
    with pytest.raises(gc.GraphError, match="diverged") as e:
        train(digits, epochs=2, save=ck, resume=ck, lr=1e30)
    words_in(one_line(e), "lower the learning rate", "--allow-nonfinite")
    assert ck.read_bytes() == good
    r, lines = train(digits, epochs=2, save=ck, resume=ck, lr=1e30, allow_nonfinite=True)
    assert ck.read_bytes() == good                            # NaN/inf weights never replace it
    assert any("not overwritten" in ln for ln in lines), lines
    assert not np.isfinite(r.train_loss[-1])


@pytest.mark.parametrize("lr", ["inf", "nan", "0", "-1"])
def test_05_non_positive_or_non_finite_learning_rates_are_refused(capsys, lr):
    rc, _, lines = cli_run(capsys, "train", "mlp", "--lr", lr, "--backend", "reference")
    assert rc == 1 and len(lines) == 1 and "learning rate" in lines[0], lines


# ------------------------------------------------------------------ 6: output paths checked before the work

def test_06_missing_save_directory_fails_before_training(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(gc.train, "_compile", lambda *a: pytest.fail("trained before checking --save"))
    with pytest.raises(gc.GraphError, match="does not exist") as e:
        train(digits, epochs=1, save=tmp_path / "no" / "dir" / "x.npz")
    assert type(e.value).__name__ == "OutputError" and "\n" not in str(e.value)


def test_06_render_and_bench_check_their_output_before_the_work(tmp_path, monkeypatch, capsys):
    from graphc import bench, rendering
    monkeypatch.setattr(rendering, "prepare", lambda *a, **k: pytest.fail("rendered before checking -o"))
    monkeypatch.setattr(bench, "_load", lambda *a, **k: pytest.fail("benchmarked before checking --json"))
    (tmp_path / "d.svg").mkdir()
    for argv in (["render", "mlp", "-o", str(tmp_path / "no" / "x.svg")],
                 ["bench", "mlp", "--json", str(tmp_path / "no" / "x.json")],
                 ["render", "mlp", "-o", str(tmp_path / "d.svg")]):                # a directory
        rc, _, lines = cli_run(capsys, *argv)
        assert rc == 1 and len(lines) == 1 and "cannot write" in lines[0], (argv, lines)


# ------------------------------------------------------------------ 7: axes out of range

def test_07_out_of_range_axes_are_refused():
    g = gc.Graph()
    x = g.input("x", (None, 2, 4, 4))
    for make in (lambda: g.concat([x, x], axis=5), lambda: g.sum(x, axes=7), lambda: g.mean(x, axes=(1, -9)),
                 lambda: g.softmax(x, axis=5), lambda: g.slice(x, axis=9, start=0, stop=1),
                 lambda: g.transpose(x, (0, 1, 2, 7)), lambda: g.sum(x, axes=(1, 1)), lambda: g.concat([x], 1.0)):
        with pytest.raises(gc.ShapeError) as e:
            make()
        one_line(e)
    assert g.concat([x, x], axis=-3).shape == ("N", 4, 4, 4)          # in range, negative: numpy's rule
    assert g.softmax(x, axis=-1).shape == x.shape


# ------------------------------------------------------------------ 8: saturated cross_entropy(softmax(z))

def test_08_saturated_softmax_cross_entropy_is_zero_not_nan():
    g = gc.Graph("sat", dtype="float64")
    z, y, t = g.input("z", (None, 3)), g.input("y", (None,), dtype="int64"), g.input("t", (None, 3))
    p = g.softmax(z, axis=1)
    g.output(g.cross_entropy(p, y, name="ce"), g.cross_entropy(p, t, name="ce_onehot"),
             g.softmax_cross_entropy(z, t, name="sce_onehot"))
    feeds = {"z": np.array([[1e4, 0.0, 0.0]]), "y": np.array([0]), "t": np.array([[1.0, 0.0, 0.0]])}
    out = gc.compile(g).run(feeds)
    assert all(float(v) == 0.0 for v in out.values()), out
    grads = gc.compile(gc.grad(g, wrt=["z"], loss="ce")).run(feeds)
    assert np.isfinite(grads["grad/z"]).all(), grads


# ------------------------------------------------------------------ 9: empty batch

@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_09_empty_batch_is_a_feed_error(clf_exes, backend):
    for train_exe in (False, True):
        exe = clf_exes[(backend, train_exe)]
        call = exe.step if train_exe else exe.run
        with pytest.raises(FeedError, match="empty") as e:
            call({"x": X7[:0], "labels": np.zeros(0, np.int64)})
        one_line(e)


# ------------------------------------------------------------------ 10: definition-time checks

def test_10_definition_time_checks():
    g = gc.Graph()
    x = g.input("x", (None, 2, 8, 8))
    w = g.param("w", (2, 2, 3, 3))
    bad = {"conv stride 0": lambda: g.conv(x, w, stride=0),
           "conv pad -1": lambda: g.conv(x, w, pad=-1),            # 8x8 with pad -1 would "fit": 4x4
           "conv pads 4-tuple negative": lambda: g.conv(x, w, pad=(1, 1, -1, 0)),
           "maxpool size 0": lambda: g.maxpool(x, 0),
           "maxpool stride 0": lambda: g.maxpool(x, 2, 0),
           "avgpool size -1": lambda: g.avgpool(x, -1),
           "maxpool pad >= size": lambda: g.maxpool(x, 2, 1, pad=3),
           "maxpool pad == size": lambda: g.maxpool(x, 2, 1, pad=2),
           "reshape -8": lambda: g.reshape(x, (None, -8, -8)),
           "reshape -8 -16": lambda: g.reshape(x, (None, -8, -16)),    # 128 elements: the counts match
           "reshape 0": lambda: g.reshape(x, (None, 0, 128)),
           "crop larger than input": lambda: g.crop2d(x, 5),
           "crop negative": lambda: g.crop2d(x, -1),
           "pad negative": lambda: g.pad2d(x, (0, 0, -2, 0)),
           "param 2.5": lambda: g.param("p1", (2.5, 3)),
           "param 'a'": lambda: g.param("p2", ("a", 3)),
           "param True": lambda: g.param("p3", (True, 3)),
           "input 5": lambda: g.input("i1", 5),
           "input 0 dim": lambda: g.input("i2", (None, 0)),
           "slice past the end": lambda: g.slice(x, 1, 0, 3),
           "slice empty": lambda: g.slice(x, 2, 4, 4),
           "dropout rate 'x'": lambda: g.dropout(x, "x"),
           "graph seed -1": lambda: gc.Graph(seed=-1)}
    for what, make in bad.items():
        with pytest.raises(gc.GraphError) as e:
            make()
        assert "\n" not in str(e.value), what
    assert g.maxpool(x, 3, 1, pad=1).shape == ("N", 2, 8, 8)           # Inception's pool still fine


# ------------------------------------------------------------------ 11: declared dtypes

def test_11_a_float_dtype_other_than_the_graphs_is_refused_at_definition():
    g = gc.Graph()                                   # float32
    for make in (lambda: g.input("x", (None, 1, 4, 4), dtype="float64"),
                 lambda: g.param("w", (1, 1, 3, 3), dtype="float64"),
                 lambda: g.const(np.ones(3), dtype="float64")):
        with pytest.raises(gc.DTypeError) as e:
            make()
        words_in(one_line(e), "float64 in a float32 graph", "Graph(dtype=")
    with pytest.raises(gc.DTypeError) as e:
        g.input("h", (None, 2), dtype="float16")
    one_line(e)
    g64 = gc.Graph(dtype="float64")
    x = g64.input("x", (None, 1, 4, 4))               # the graph's dtype by default
    c = g64.conv(x, g64.param("w", (1, 1, 3, 3)))
    g64.output(c)
    assert x.dtype == "float64" and gc.compile(g64).run({"x": np.ones((1, 1, 4, 4))})[c.name].dtype == np.float64


# ------------------------------------------------------------------ 12: crafted checkpoints

@pytest.fixture(scope="module")
def good_checkpoint(digits, tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck") / "good.npz"
    train(digits, epochs=1, save=ck)
    return ck


@pytest.mark.parametrize("meta, arrays", [
    ({"epoch": "abc"}, {}), ({"history": "oops"}, {}), ({"partial": {"loss_sum": "x"}}, {}),
    ({"batch_in_epoch": -5}, {}), ({"seed": -3}, {}), ({"optimizer": "adam"}, {}),
    ({"history": {"train_loss": ["a"]}}, {}), ({}, {"__step__": np.arange(3)}), ({}, {"__step__": np.array(-2)}),
    ({}, {"__step__": np.array(1.5)})])
def test_12_crafted_checkpoint_metadata_is_a_checkpoint_error(digits, good_checkpoint, tmp_path, meta, arrays):
    with np.load(good_checkpoint) as z:      # edited raw, as an attacker would: only the metadata and step
        raw = {k: z[k] for k in z.files}
    raw["__meta__"] = np.array(json.dumps({**json.loads(str(raw["__meta__"])), **meta}))
    raw.update(arrays)
    np.savez(tmp_path / "bad.npz", **raw)
    with pytest.raises(CheckpointError) as e:
        train(digits, epochs=2, resume=tmp_path / "bad.npz")
    one_line(e)


def test_12_a_npy_file_or_garbage_is_not_a_checkpoint(digits, tmp_path):
    np.save(tmp_path / "w.npy", np.zeros(3))
    (tmp_path / "j.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    for p in (tmp_path / "w.npy", tmp_path / "j.npz"):
        with pytest.raises(CheckpointError) as e:
            train(digits, epochs=1, resume=p)
        one_line(e)


# ------------------------------------------------------------------ 13: CLI gaps

def test_13_bad_seed_and_batch_are_one_line_errors(capsys):
    for argv in (["train", "mlp", "--seed", "-1", "--backend", "reference"], ["bench", "mlp", "--batch", "-3"],
                 ["bench", "mlp", "--batch", "0"], ["train", "mlp", "--batch", "0", "--backend", "reference"],
                 ["train", "mlp", "--epochs", "-1", "--backend", "reference"]):
        rc, out, lines = cli_run(capsys, *argv)
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("graphc: error: "), (argv, lines)
        assert "Traceback" not in out


def test_13_model_functions_without_seed_and_raising_ones(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text("import graphc as gc\n\ndef build():\n    return gc.models.mlp()\n\n"
                 "def boom(seed=0):\n    raise ValueError('bad\\nthing')\n")
    assert gc.models.load(f"{f}:build", seed=3).name == "mlp"        # README-style: no seed kwarg
    for verb in ("summary", "render", "train", "bench"):
        extra = ["-o", str(tmp_path / "o.svg")] if verb == "render" else \
            ["--backend", "reference"] if verb in ("train", "bench") else []
        rc, _, lines = cli_run(capsys, verb, f"{f}:boom", *extra)
        assert rc == 1 and len(lines) == 1 and "cannot load model" in lines[0] and "ValueError" in lines[0], \
            (verb, lines)


# ------------------------------------------------------------------ 14: IDX reader

def _idx_header(dims):
    return bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


def test_14_overflowing_idx_dims_are_a_data_error(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(_idx_header([2**32 - 1] * 3) + b"\0" * 100)     # product overflows int64
    with pytest.raises(DataError, match="header") as e:
        data.read_idx(p)
    one_line(e)


def test_14_zero_images_are_refused(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    for name, arr in (("train-images-idx3-ubyte", np.zeros((0, 28, 28))), ("train-labels-idx1-ubyte", np.zeros(0)),
                      ("t10k-images-idx3-ubyte", np.zeros((2, 28, 28))), ("t10k-labels-idx1-ubyte", np.zeros(2))):
        data.write_idx(d / name, arr.astype(np.uint8))
    with pytest.raises(DataError, match="no images") as e:
        data.load_dataset(f"mnist:{d}")
    one_line(e)
    empty = data.Dataset(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), np.zeros((2, 28, 28), np.uint8),
                         np.zeros(2, np.int64), "empty")
    with pytest.raises(DataError, match="non-empty"):
        train(empty, epochs=1)


def test_14_gzip_decompression_is_capped(tmp_path, monkeypatch):
    p = tmp_path / "big-idx3-ubyte.gz"
    n = 4 * 1024 * 1024                                              # 4 MiB of zeros: a 4 KB file
    with gzip.open(p, "wb") as f:
        f.write(_idx_header([n // 784, 28, 28]) + bytes(n // 784 * 784))
    assert os.path.getsize(p) < 50_000
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1 << 20, raising=False)
    with pytest.raises(DataError, match="1,048,576") as e:
        data.read_idx(p)
    one_line(e)


# ------------------------------------------------------------------ 15: stale temp files

def test_15_stale_temp_files_are_cleaned_on_the_next_save_or_load(digits, tmp_path):
    ck = tmp_path / "ck.npz"
    r, _ = train(digits, epochs=1, save=ck)
    dead = tmp_path / ".ck.npz.999999999.abcd1234.tmp"            # a writer killed mid-save (no such pid)
    old = tmp_path / ".ck.npz.zz9xq1w2.tmp"                         # an older graphc's temp name, hours old
    live = tmp_path / f".ck.npz.{os.getppid()}.efgh5678.tmp"        # a running writer: kept
    other = tmp_path / ".ck.npz.x.999999999.abcd.tmp"               # another file's temp (ck.npz.x): kept
    for p in (dead, old, live, other):
        p.write_bytes(b"half a checkpoint")
    os.utime(old, (0, 0))
    save_checkpoint(ck, r.exe)
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    dead.write_bytes(b"x")
    read_checkpoint(ck)
    assert not dead.exists()


# ------------------------------------------------------------------ 16: numba 0-d outputs

def test_16_numba_keeps_zero_d_outputs_zero_d():
    pytest.importorskip("numba")
    g = gc.Graph()
    v = g.identity(g.const(np.asarray(1.0)))
    g.output(v)
    assert gc.compile(g).run({})[v.name].shape == ()
    assert gc.compile(g, backend="numba").run({})[v.name].shape == ()
    g = gc.Graph()                   # 0-d inputs, consts and results beside batched ones: the reference's shapes
    s, a, c = g.input("s", ()), g.input("a", (None, 3)), g.const(np.asarray(2.0))
    g.output(g.mul(s, c, name="sc"), g.add(a, s, name="as"), g.sum(a, name="tot"), g.relu(s, name="rs"))
    feeds = {"s": np.asarray(3.0, np.float32), "a": np.ones((2, 3), np.float32)}
    shapes = [{k: v.shape for k, v in gc.compile(g, backend=b).run(feeds).items()} for b in ("reference", "numba")]
    assert shapes[0] == shapes[1] == {"sc": (), "as": (2, 3), "tot": (), "rs": ()}, shapes


# ------------------------------------------------------------------ 17: minor API validation

def test_17_optimizer_and_compile_arguments_are_validated():
    g = classifier()
    for make in (lambda: gc.optim.SGD(-1.0), lambda: gc.optim.SGD(float("nan")), lambda: gc.optim.SGD(float("inf")),
                 lambda: gc.optim.Adam("x"), lambda: gc.optim.SGD(0.1, momentum=1.5),
                 lambda: gc.optim.Adam(beta2=1.0), lambda: gc.compile(g, threads="bogus"),
                 lambda: gc.compile(g, threads=0), lambda: gc.compile(g, optimizer="adam")):
        with pytest.raises(gc.GraphError) as e:
            make()
        one_line(e)


def test_17_a_param_larger_than_memory_names_itself_and_its_bytes():
    g = gc.Graph()
    g.output(g.relu(g.param("big", (10**6, 10**6))))
    for opt in (None, gc.optim.Adam()):
        with pytest.raises(gc.GraphError) as e:
            gc.compile(g, optimizer=opt)
        words_in(one_line(e), "'big'", "(1000000, 1000000)", "4,000,000,000,000 bytes")


# ------------------------------------------------------------------ the JSON of bench, for the fault tests

def test_bench_json_written_atomically(tmp_path):
    from graphc.bench import run_bench
    out = tmp_path / "b.json"
    run_bench("mlp", backend="reference", batch=2, json_path=out, repeats=1, warmup=0, measure_compile=False,
              roofline=False, quiet=True)
    assert json.loads(out.read_text())["batch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]
