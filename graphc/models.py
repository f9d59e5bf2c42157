"""The model zoo: each function returns a Graph with input "x" (NCHW images), input "labels" (int64
class ids), a "logits" value and a "loss" output (softmax cross-entropy, mean over the batch).
With loss=False the graph takes only "x" and outputs "logits". The digit models (mlp, lenet5,
mnist_convnet, codelab_cnn, resnet, inception) take in_channels, image_size and num_classes too, so
they fit other data (graphc train --data file.npz passes the data's).

Architectures here as the course describes them; the torchvision ImageNet models (resnet18/34/50,
mobilenet_v2, googlenet, vgg16_bn, squeezenet1_0) and the paper GoogLeNet are in models_imagenet.py.
"""
from __future__ import annotations

import importlib.util
import inspect
import os

import numpy as np

from graphc import nn
from graphc.errors import GraphError
from graphc.graph import Graph


_finish = nn.finish


def _digits_input(g, in_channels, image_size):
    """The input "x" of the digit models: (N, in_channels, H, W); image_size an int or (H, W). The
    defaults are MNIST's (1, 28, 28); other values fit them to your own data (graphc train --data)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return g.input("x", (None, in_channels, h, w))


def mlp(loss=True, seed=0, in_channels=1, image_size=28, num_classes=10):
    """The course's 3-layer MLP: 784-16-16-10, ReLU, softmax."""
    g = Graph("mlp", seed=seed)
    x = _digits_input(g, in_channels, image_size)
    h = nn.dense(g, g.flatten(x, name="flatten"), 16, name="fc1", act="relu")
    h = nn.dense(g, h, 16, name="fc2", act="relu")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


def lenet5(loss=True, seed=0, in_channels=1, image_size=28, num_classes=10):
    """LeNet-5 for 28x28 digits (ReLU and max pooling): conv 6@5x5 pad 2 - pool - conv 16@5x5 - pool -
    120 - 84 - 10."""
    g = Graph("lenet5", seed=seed)
    x = _digits_input(g, in_channels, image_size)
    h = g.maxpool(nn.conv2d(g, x, 6, 5, pad=2, name="c1"), 2, name="s2")
    h = g.maxpool(nn.conv2d(g, h, 16, 5, name="c3"), 2, name="s4")
    h = nn.dense(g, g.flatten(h, name="flatten"), 120, name="f5", act="relu")
    h = nn.dense(g, h, 84, name="f6", act="relu")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


def mnist_convnet(loss=True, seed=0, dropout=0.5, in_channels=1, image_size=28, num_classes=10):
    """The Keras "mnist_convnet" example: Conv2D(32, 3x3, relu) - MaxPool 2 - Conv2D(64, 3x3, relu) -
    MaxPool 2 - Flatten - Dropout(0.5) - Dense(10, softmax). Keras's glorot-uniform weights, zero biases."""
    g = Graph("mnist_convnet", seed=seed)
    x = _digits_input(g, in_channels, image_size)
    h = g.maxpool(nn.conv2d(g, x, 32, 3, name="conv1", init="glorot"), 2, name="pool1")
    h = g.maxpool(nn.conv2d(g, h, 64, 3, name="conv2", init="glorot"), 2, name="pool2")
    h = g.flatten(h, name="flatten")
    if dropout:
        h = g.dropout(h, dropout, name="dropout")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


def codelab_cnn(loss=True, seed=0, in_channels=1, image_size=28, num_classes=10):
    """The TensorFlow MNIST codelab CNN: conv 3x3x12 same - conv 6x6x24 stride 2 same - conv 6x6x32
    stride 2 same (all relu) - flatten 7x7x32 = 1568 - dense 200 relu - dense 10."""
    g = Graph("codelab_cnn", seed=seed)
    x = _digits_input(g, in_channels, image_size)
    h = nn.conv2d(g, x, 12, 3, pad="same", name="conv1")
    h = nn.conv2d(g, h, 24, 6, stride=2, pad="same", name="conv2")
    h = nn.conv2d(g, h, 32, 6, stride=2, pad="same", name="conv3")
    h = nn.dense(g, g.flatten(h, name="flatten"), 200, name="fc1", act="relu")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


def alexnet(loss=True, seed=0, num_classes=1000, dropout=0.5, lrn=True):
    """AlexNet (single tower), the paper's: 227x227x3; conv1 96@11x11/4 - LRN - pool 3/2 - conv2 256@5x5
    pad 2 - LRN - pool 3/2 - conv3 384@3x3 pad 1 - conv4 384@3x3 pad 1 - conv5 256@3x3 pad 1 - pool 3/2 -
    FC 4096 - FC 4096 - FC 1000. LRN (after the ReLUs of conv1 and conv2): size 5, alpha 1e-4, beta 0.75,
    k 2 (the paper's constants); lrn=False leaves it out. 62,378,344 parameters either way."""
    g = Graph("alexnet", seed=seed)
    x = g.input("x", (None, 3, 227, 227))

    def norm(h, name):
        return g.lrn(h, 5, 1e-4, 0.75, 2.0, name=name) if lrn else h
    h = g.maxpool(norm(nn.conv2d(g, x, 96, 11, stride=4, name="conv1"), "norm1"), 3, 2, name="pool1")
    h = g.maxpool(norm(nn.conv2d(g, h, 256, 5, pad=2, name="conv2"), "norm2"), 3, 2, name="pool2")
    h = nn.conv2d(g, h, 384, 3, pad=1, name="conv3")
    h = nn.conv2d(g, h, 384, 3, pad=1, name="conv4")
    h = g.maxpool(nn.conv2d(g, h, 256, 3, pad=1, name="conv5"), 3, 2, name="pool5")
    h = g.flatten(h, name="flatten")
    for i in (6, 7):
        if dropout:
            h = g.dropout(h, dropout, name=f"drop{i}")
        h = nn.dense(g, h, 4096, name=f"fc{i}", act="relu")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(loss=True, seed=0, num_classes=1000, image_size=224, dropout=0.5):
    """VGG16: 13 conv 3x3 stride 1 pad 1, max pool 2x2 stride 2 after each block, FC 4096-4096-1000."""
    g = Graph("vgg16", seed=seed)
    h = g.input("x", (None, 3, image_size, image_size))
    block, layer = 1, 1
    for c in VGG16_CONFIG:
        if c == "M":
            h = g.maxpool(h, 2, name=f"pool{block}")
            block, layer = block + 1, 1
        else:
            h = nn.conv2d(g, h, c, 3, pad=1, name=f"conv{block}_{layer}")
            layer += 1
    h = g.flatten(h, name="flatten")
    for i in (6, 7):
        h = nn.dense(g, h, 4096, name=f"fc{i}", act="relu")
        if dropout:
            h = g.dropout(h, dropout, name=f"drop{i}")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


def resnet_block(loss=True, seed=0, channels=8, image_size=8):
    """One ResNet basic block with a projection skip, then global average pooling and a classifier."""
    g = Graph("resnet_block", seed=seed)
    x = g.input("x", (None, 4, image_size, image_size))
    h = nn.residual_block(g, x, channels, stride=1, name="res1")
    h = g.global_avgpool(h, name="gap")
    return _finish(g, nn.dense(g, h, 10, name="logits", init="glorot"), loss)


def resnet(loss=True, seed=0, in_channels=1, image_size=28, num_classes=10):
    """A small ResNet for 28x28 digits, with batch norm as ResNets have it: conv 16 + BN + ReLU - basic
    blocks 16, 32/2, 64/2 (conv-BN-ReLU-conv-BN plus the input, or its 1x1 conv + BN) - global average
    pool - 10."""
    g = Graph("resnet", seed=seed)
    x = _digits_input(g, in_channels, image_size)
    h = nn.conv_bn_relu(g, x, 16, 3, pad=1, name="stem", act_name="stem.relu")
    h = nn.basic_block(g, h, 16, name="res1")
    h = nn.basic_block(g, h, 32, stride=2, name="res2")
    h = nn.basic_block(g, h, 64, stride=2, name="res3")
    h = g.global_avgpool(h, name="gap")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


def inception_block(loss=True, seed=0, image_size=8):
    """One Inception block (1x1, 3x3, 5x5, pool branches concatenated), global average pool, classifier."""
    g = Graph("inception_block", seed=seed)
    x = g.input("x", (None, 4, image_size, image_size))
    h = nn.inception_block(g, x, 4, 4, 8, 2, 4, 4, name="inc1")
    h = g.global_avgpool(h, name="gap")
    return _finish(g, nn.dense(g, h, 10, name="logits", init="glorot"), loss)


def inception(loss=True, seed=0, in_channels=1, image_size=28, num_classes=10):
    """A small GoogLeNet-style net for 28x28 digits: stem conv, pool, two Inception blocks, GAP, 10."""
    g = Graph("inception", seed=seed)
    x = _digits_input(g, in_channels, image_size)
    h = g.maxpool(nn.conv2d(g, x, 16, 3, pad=1, name="stem"), 2, name="stem.pool")
    h = nn.inception_block(g, h, 8, 8, 16, 4, 8, 8, name="inc1")
    h = g.maxpool(h, 2, name="pool2")
    h = nn.inception_block(g, h, 16, 16, 32, 8, 16, 16, name="inc2")
    h = g.global_avgpool(h, name="gap")
    return _finish(g, nn.dense(g, h, num_classes, name="logits", init="glorot"), loss)


# The worked example of the course unit (its notes), with its exact weights.
SEED_X = np.array([[[[1, 0, 1], [0, 1, 0], [1, 0, 1]]]], dtype=np.float64)
SEED_LABELS = np.array([0])          # one-hot (1.0, 0.0)


def seed_cnn(loss=True, seed=0, dtype="float64"):
    """3x3 input, one 2x2 filter [[0.9,0.1],[0.1,0.9]] bias 0.1, ReLU, flatten, dense 2 (ReLU), dense 2
    softmax, cross-entropy. Feed x = models.SEED_X, labels = models.SEED_LABELS."""
    g = Graph("seed_cnn", seed=seed, dtype=dtype)
    x = g.input("x", (None, 1, 3, 3))
    f = g.param("conv.w", value=[[[[0.9, 0.1], [0.1, 0.9]]]])
    b1 = g.param("conv.b", value=[0.1])
    c = g.relu(g.conv(x, f, b1, name="conv"), name="C")
    wh = g.param("hidden.w", value=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    bh = g.param("hidden.b", value=[0.2, 0.2])
    h = g.relu(g.dense(g.flatten(c, name="flatten"), wh, bh, name="hidden"), name="h")
    wo = g.param("out.w", value=[[0.1, 0.2], [0.3, 0.4]])
    bo = g.param("out.b", value=[0.3, 0.3])
    return _finish(g, g.dense(h, wo, bo, name="logits"), loss)


from graphc import models_imagenet as _imagenet  # noqa: E402  (resnet18 ... squeezenet1_0)

ZOO = {f.__name__: f for f in (mlp, lenet5, mnist_convnet, codelab_cnn, alexnet, vgg16, resnet_block, resnet,
                               inception_block, inception, seed_cnn) + _imagenet.MODELS}


def names():
    return sorted(ZOO)


def _accepted(fn, kwargs):
    """The kwargs `fn` takes: a user's `def build():` gets no seed (it seeds its graph itself)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def load(spec, **kwargs) -> Graph:
    """A zoo name ("lenet5") or "path/to/file.py:function" returning a Graph, or "model.onnx". kwargs (e.g. seed) are
    passed on when the function takes them. A user's file or function that raises is one GraphError
    line ("cannot load model ...: ValueError: ..."), the traceback chained for --debug."""
    return build(spec, **kwargs)[0]


def build(spec, **kwargs):
    """(graph, the kwargs the model function took): load(), telling which of kwargs were used (what a
    checkpoint records to rebuild the graph)."""
    if isinstance(spec, str) and spec.lower().endswith(".onnx"):
        from graphc.onnx.cli import load_model
        return load_model(spec, **kwargs), {}
    if not isinstance(spec, str):
        raise GraphError(f"MODEL must be a zoo name or path/to/file.py:function, got {type(spec).__name__}")
    if spec in ZOO:
        used = _accepted(ZOO[spec], kwargs)
        return ZOO[spec](**used), used
    if ":" in spec:
        path, fn = spec.rsplit(":", 1)
        if not os.path.isfile(path):
            raise GraphError(f"model file {path!r} not found (MODEL is a zoo name or path/to/file.py:function)")
        modspec = importlib.util.spec_from_file_location(f"graphc_user_model_{abs(hash(path))}", path)
        mod = importlib.util.module_from_spec(modspec)
        try:
            modspec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - the user's own code raised
            raise GraphError(f"cannot load model {spec!r}: {path} raised {type(e).__name__}: {e}") from e
        if not callable(getattr(mod, fn, None)):
            raise GraphError(f"{path} has no function {fn!r}")
        fn = getattr(mod, fn)
        used = _accepted(fn, kwargs)
        try:
            g = fn(**used)
        except GraphError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's own code raised
            raise GraphError(f"cannot load model {spec!r}: {type(e).__name__}: {e}") from e
        if not isinstance(g, Graph):
            raise GraphError(f"{spec} returned {type(g).__name__}, not a graphc.Graph")
        return g, used
    raise GraphError(f"unknown model {spec!r}; zoo models: {', '.join(names())}; or give path/to/file.py:function")
