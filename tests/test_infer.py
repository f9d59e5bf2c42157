"""Tests for graphc.infer: predict, confusion matrix, and the optional matplotlib plots."""

import builtins

import numpy as np
import pytest

import graphc as gc
from graphc import data, infer
from graphc.errors import GraphError
from graphc.infer import PlotError, confusion_matrix, format_confusion_matrix, predict
from graphc.train import train


@pytest.fixture(scope="module")
def ds():
    full = data.load_mnist5k()
    return data.Dataset(full.x_train[:256], full.y_train[:256], full.x_test[:100], full.y_test[:100], "tiny")


@pytest.fixture(scope="module")
def result(ds):
    return train("mlp", data=ds, epochs=2, batch=32, lr=3e-3, backend="reference", progress=False, log=None)


def test_predict_from_result_exe_and_graph(ds, result):
    classes, probs = predict(result, ds.x_test, batch=32)          # uint8 images, uneven last batch
    assert classes.shape == (100,) and classes.dtype == np.int64
    assert probs.shape == (100, 10)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs >= 0).all()
    assert np.array_equal(classes, probs.argmax(axis=1))
    assert np.isclose((classes == ds.y_test).mean(), result.final_test_accuracy)
    # the training executable (inference mode) and already-normalized float input give the same answer
    c2, p2 = predict(result.exe, data.normalize(ds.x_test), batch=1000)
    assert np.array_equal(c2, classes) and np.allclose(p2, probs, atol=1e-6)
    # a Graph is compiled with its initial weights
    c3, p3 = predict(gc.models.load("mlp", seed=0), ds.x_test[:5])
    assert c3.shape == (5,) and p3.shape == (5, 10)
    # a forward-only graph (no labels input) works too
    c4, _ = predict(gc.models.load("mlp", loss=False), ds.x_test[:5])
    assert np.array_equal(c4, c3)


def test_predict_errors(result):
    with pytest.raises(GraphError, match="predict takes"):
        predict("mlp", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(GraphError, match="images shaped"):
        predict(result, np.zeros((2, 784), np.float32))
    with pytest.raises(GraphError, match="batch"):
        predict(result, np.zeros((2, 28, 28), np.uint8), batch=0)
    c, p = predict(result, np.zeros((0, 28, 28), np.uint8))
    assert c.shape == (0,)


def test_confusion_matrix():
    t = np.array([0, 0, 1, 2, 2, 2])
    p = np.array([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix(t, p, k=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert cm.dtype == np.int64 and cm.sum() == 6 and np.trace(cm) == 4
    assert confusion_matrix(t, p).shape == (10, 10)
    text = format_confusion_matrix(cm)
    assert "recall" in text and "0.667" in text
    with pytest.raises(GraphError, match="outside 0..2"):
        confusion_matrix([0, 3], [0, 1], k=3)
    with pytest.raises(GraphError, match="differ in length"):
        confusion_matrix([0, 1], [0], k=3)
    with pytest.raises(GraphError, match="integer"):
        confusion_matrix([0.5], [0], k=3)


def test_plots_without_matplotlib_say_so(result, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(PlotError, match="needs matplotlib.*pip install matplotlib"):
        infer.plot_loss_curve(result, tmp_path / "loss.png")
    with pytest.raises(ImportError):            # PlotError is an ImportError too
        infer.plot_misclassified(np.zeros((1, 28, 28)), [1], [2], tmp_path / "m.png")
    assert not list(tmp_path.iterdir())


def test_plots_with_matplotlib(ds, result, tmp_path):
    pytest.importorskip("matplotlib")
    out = infer.plot_loss_curve(result, tmp_path / "loss.png")
    assert out.stat().st_size > 1000
    classes, _ = predict(result, ds.x_test)
    out = infer.plot_misclassified(ds.x_test, ds.y_test, classes, tmp_path / "wrong.png")
    assert out.stat().st_size > 1000
    infer.plot_misclassified(ds.x_test[:2], ds.y_test[:2], ds.y_test[:2], tmp_path / "none.png")
    assert (tmp_path / "none.png").is_file()
