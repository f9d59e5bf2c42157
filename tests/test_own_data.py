"""Your own data: Dataset.from_arrays (any float or uint8 dtype, any channel count and layout), .npz
files and image folders through `graphc train --data`, preprocessing fitted on the training split and
recorded, augmentation, the validation split."""
import re

import numpy as np
import pytest

import graphc as gc
from graphc import cli, data
from graphc.augment import Augment
from graphc.checkpoint import read_checkpoint
from graphc.errors import DataError, GraphError
from graphc.preprocess import Preprocess


def colour_data(n=200, size=16, channels=3, seed=0, dtype=np.float32):
    """Two classes told apart by the first channel's brightness (learnable in one epoch)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.random((n, channels, size, size))
    x[y == 1, 0] += 0.6
    return x.astype(dtype), y


# ------------------------------------------------------------------------------------------ arrays

def test_from_arrays_layouts_dtypes_and_split():
    x, y = colour_data(100)
    ds = data.Dataset.from_arrays(x.transpose(0, 2, 3, 1), y, classes=["dim", "bright"])     # channels last
    assert ds.x_train.shape[1:] == (3, 16, 16) and len(ds.x_train) + len(ds.x_test) == 100
    assert len(ds.x_test) == 20 and ds.num_classes == 2 and ds.classes == ("dim", "bright")
    for c in (0, 1):                                     # stratified: 20% of each class held out
        assert abs((ds.y_test == c).sum() - round(0.2 * (y == c).sum())) <= 1
    assert ds.normalization == "standardize"
    five = data.Dataset.from_arrays(np.zeros((10, 5, 4, 4), np.float64), np.arange(10) % 2)   # any channel count
    assert five.x_train.shape[1] == 5
    grey = data.Dataset.from_arrays(np.zeros((10, 8, 8), np.uint8), np.arange(10) % 2, test_fraction=0.4)
    assert grey.x_train.shape[1:] == (1, 8, 8) and len(grey.x_test) == 4        # 2 of each class
    given = data.Dataset.from_arrays(x[:80], y[:80], x[80:], y[80:])
    assert len(given.x_test) == 20 and np.array_equal(given.y_test, y[80:])


def test_from_arrays_errors():
    x, y = colour_data(20)
    cases = [((x.reshape(20, -1), y), "flat vectors"), ((np.full((4, 3, 4, 4), np.nan), [0, 1, 0, 1]), "NaN"),
             ((x, y[:10]), "one label per image"), ((x, -y - 1), "class ids"),
             ((np.full((4, 4, 4), 300), [0, 1, 0, 1]), "0..255"), ((x, y + 0.5), "fractional"),
             ((x.astype(str), y), "numbers")]
    for args, msg in cases:
        with pytest.raises(DataError, match=msg):
            data.Dataset.from_arrays(*args)
    with pytest.raises(DataError, match="both x_test and y_test"):
        data.Dataset.from_arrays(x, y, x_test=x)
    with pytest.raises(DataError, match="shaped"):
        data.Dataset.from_arrays(x, y, x[:, :, :8], y)
    with pytest.raises(DataError, match="class names"):
        data.Dataset.from_arrays(x, y, classes=["one"])


def test_npz_files(tmp_path):
    x, y = colour_data(50)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, class_names=np.array(["dim", "bright"]))
    ds = data.load_dataset(str(tmp_path / "a.npz"))
    assert ds.classes == ("dim", "bright") and len(ds.x_test) == 10
    np.savez(tmp_path / "b.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    assert len(data.load_dataset(str(tmp_path / "b.npz")).x_test) == 10
    np.savez(tmp_path / "c.npz", images=x)
    with pytest.raises(DataError, match="no x_train or y_train"):
        data.load_dataset(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x)
    with pytest.raises(DataError, match="only one of x_test and y_test"):
        data.load_dataset(str(tmp_path / "d.npz"))
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        data.load_dataset(str(tmp_path / "e.npz"))
    with pytest.raises(DataError, match="not found"):
        data.load_dataset(str(tmp_path / "missing.npz"))


# ------------------------------------------------------------------------------------------ preprocessing

def test_preprocess_standardizes_with_training_statistics():
    x, _ = colour_data(64, dtype=np.float64)
    pre = Preprocess.fit(x, "standardize")
    z = pre(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert np.array_equal(pre(x[0]), z[:1]) and np.array_equal(pre(x[0].transpose(1, 2, 0)), z[:1])   # one image
    assert Preprocess.from_meta(pre.to_meta()) == pre
    with pytest.raises(DataError, match="trained on"):
        pre(np.zeros((2, 3, 8, 8)))
    digits = Preprocess.fit(np.zeros((5, 28, 28), np.uint8))          # MNIST's default: pixels / 255
    img = np.full((28, 28), 255, np.uint8)
    assert digits.mode == "scale" and digits(img).shape == (1, 1, 28, 28) and digits(img).max() == 1.0
    batch = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    assert np.array_equal(digits(batch), data.normalize(batch))      # bit for bit what MNIST training always fed
    with pytest.raises(DataError, match="normalization"):
        Preprocess.fit(x, "whiten")


def test_augment_crops_and_flips_deterministically():
    assert Augment.parse("crop:4,flip") == Augment(4, True) and Augment.parse("crop") == Augment(4, False)
    assert Augment.parse(None) is None and Augment.parse("none") is None
    for bad in ("rotate", "crop:x", "crop:0", "flip:2"):
        with pytest.raises(GraphError, match="augment"):
            Augment.parse(bad)
    x = np.arange(2 * 1 * 6 * 6, dtype=np.float32).reshape(2, 1, 6, 6)
    flip = Augment(0, True)(x, seed=0, epoch=0, batch=0)
    for a, b in zip(x, flip):                            # each image as it was, or mirrored
        assert np.array_equal(a, b) or np.array_equal(a[:, :, ::-1], b)
    crop = Augment(2, False)
    one, two = crop(x, 0, 0, 0), crop(x, 0, 0, 0)
    assert np.array_equal(one, two) and one.shape == x.shape            # seeded by (seed, epoch, batch)
    shifted = [crop(x, 0, 0, b) for b in range(8)]
    assert any(not np.array_equal(s, x) for s in shifted)  # some batch is moved
    for s in shifted:                                      # a crop keeps a 2x2 block of the original, shifted
        assert set(np.unique(s)) <= set(np.unique(x)) | {0.0}


# ------------------------------------------------------------------------------------------ training

def test_validation_split_and_recorded_preprocessing(tmp_path):
    x, y = colour_data(160)
    ds = data.Dataset.from_arrays(x, y)
    r = gc.train.train("lenet5", data=ds, epochs=1, batch=32, backend="reference", validation=0.25, progress=False,
                       log=None, save=tmp_path / "v.npz", augment="flip")
    assert len(r.val_loss) == 1 and np.isfinite(r.val_loss[0]) and 0 <= r.val_accuracy[0] <= 1
    _, meta = read_checkpoint(tmp_path / "v.npz")
    assert meta["recipe"] == {"model": "lenet5", "kwargs": {"seed": 0, "in_channels": 3, "image_size": 16,
                                                            "num_classes": 2}}
    assert meta["preprocess"]["mode"] == "standardize" and len(meta["preprocess"]["mean"]) == 3
    assert meta["validation"] == 0.25 and meta["augment"] == "flip"


@pytest.mark.parametrize("model", ["codelab_cnn", "mnist_convnet"])
def test_three_channel_float_npz_trains_codelab_style_cnns(model, tmp_path, capsys):
    x, y = colour_data(240, size=16)
    np.savez(tmp_path / "rgb.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    ck = tmp_path / "run.npz"
    rc = cli.main(["train", model, "--data", str(tmp_path / "rgb.npz"), "--epochs", "2", "--batch", "20",
                   "--backend", "reference", "--lr", "0.003", "--save", str(ck), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    acc = float(re.search(r"test accuracy: (\d\.\d{4})$", out.strip()).group(1))
    assert acc >= 0.8                                     # the bright channel is easy to learn
    exe = gc.load(ck)
    assert exe.graph.nx.nodes["x"]["shape"][1:] == (3, 16, 16)
    classes, _ = gc.infer.predict(exe, x[200:])
    assert (classes == y[200:]).mean() == pytest.approx(acc, abs=1e-9)


def write_pngs(root, per_class=12, size=12):
    from PIL import Image
    rng = np.random.default_rng(1)
    for c, name in enumerate(("blue", "red")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = (rng.random((size, size, 3)) * 120).astype(np.uint8)
            img[..., 0 if name == "red" else 2] += 120
            s = size if i % 5 else size + 4                # a few of another size: resized
            Image.fromarray(img).resize((s, s)).save(root / name / f"{i:02d}.png")


def test_image_folder_trains_and_predicts_class_names(tmp_path, capsys):
    pytest.importorskip("PIL")
    write_pngs(tmp_path / "photos")
    ds = data.load_dataset(f"images:{tmp_path / 'photos'}")
    assert ds.classes == ("blue", "red") and ds.x_train.shape[1:] == (3, 12, 12)
    assert len(ds.x_test) == 4                                  # 2 of each class's 12
    ck = tmp_path / "img.npz"
    rc = cli.main(["train", "lenet5", "--data", f"images:{tmp_path / 'photos'}", "--epochs", "3", "--batch", "6",
                   "--lr", "0.003", "--backend", "reference", "--save", str(ck), "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    assert cli.main(["predict", str(ck), str(tmp_path / "photos" / "red"), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row = re.compile(r".*\.png: (red|blue) \(\d+\.\d\d%\), (red|blue) .*")
    assert len(lines) == 12 and all(row.fullmatch(s) for s in lines)
    assert sum(s.split(": ")[1].startswith("red") for s in lines) >= 9


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        data.load_dataset(f"images:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="not found"):
        data.load_dataset(f"images:{tmp_path / 'nope'}")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not an image")
    (tmp_path / "bad" / "a" / "y.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="not a readable image"):
        data.load_dataset(f"images:{tmp_path / 'bad'}")
