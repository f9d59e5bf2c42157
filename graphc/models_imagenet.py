"""The ImageNet CNNs as torchvision builds them: resnet18/34/50, mobilenet_v2, googlenet (with BN, no
auxiliary heads), vgg16_bn, squeezenet1_0; and the paper version of GoogLeNet (googlenet_lrn: LRN,
ceil-mode pools, biases, no BN).

The torchvision models have torchvision's exact architecture, parameter counts and state_dict names
(``conv1.weight``, ``layer1.0.bn1.running_mean``, ``features.3.conv.1.0.weight``, ...), so torchvision
weights load by name (exe.load_state_dict). Each takes num_classes and image_size (square inputs;
their adaptive average pools make any size from 32 up work) and returns a Graph with input "x" and,
with loss=True, "labels" and the output "loss" (else the output is "logits"). Initialisation is
graphc's (He-normal convs with fan-in, torch's default for linear layers, BN gamma 1 and beta 0), not
torchvision's exact scheme. width arguments make the small variants the tests gradcheck.
"""
from __future__ import annotations

from graphc import nn
from graphc.graph import Graph


def _input(name, image_size, seed, dtype):
    g = Graph(name, seed=seed, dtype=dtype)
    return g, g.input("x", (None, 3, image_size, image_size))


def _head(g, h, num_classes, loss, dropout=0.0, name="fc"):
    """Global average pool (torchvision's AdaptiveAvgPool2d((1, 1)) + flatten), dropout, linear."""
    h = g.global_avgpool(h, name="avgpool")
    if dropout:
        h = g.dropout(h, dropout, name="dropout")
    return nn.finish(g, g.identity(nn.linear(g, h, num_classes, name=name), name="logits"), loss)


# --- ResNet ------------------------------------------------------------------------------------------

def _resnet(name, block, layers, num_classes, image_size, loss, seed, width, dtype):
    g, x = _input(name, image_size, seed, dtype)
    h = nn.conv_bn_relu(g, x, width, 7, 2, 3, name="conv1", bn_name="bn1", act_name="relu")
    h = g.maxpool(h, 3, 2, pad=1, name="maxpool")
    for i, n in enumerate(layers):
        for j in range(n):
            h = block(g, h, width * 2 ** i, stride=2 if (i > 0 and j == 0) else 1, name=f"layer{i + 1}.{j}")
    return _head(g, h, num_classes, loss)


def resnet18(num_classes=1000, image_size=224, loss=True, seed=0, width=64, dtype="float32"):
    """ResNet-18 (He et al. 2015), torchvision's: 11,689,512 parameters at 1000 classes."""
    return _resnet("resnet18", nn.basic_block, (2, 2, 2, 2), num_classes, image_size, loss, seed, width, dtype)


def resnet34(num_classes=1000, image_size=224, loss=True, seed=0, width=64, dtype="float32"):
    """ResNet-34, torchvision's: 21,797,672 parameters at 1000 classes."""
    return _resnet("resnet34", nn.basic_block, (3, 4, 6, 3), num_classes, image_size, loss, seed, width, dtype)


def resnet50(num_classes=1000, image_size=224, loss=True, seed=0, width=64, dtype="float32"):
    """ResNet-50 (bottleneck blocks, torchvision's v1.5 with the stride on the 3x3): 25,557,032 parameters."""
    return _resnet("resnet50", nn.bottleneck, (3, 4, 6, 3), num_classes, image_size, loss, seed, width, dtype)


# --- MobileNetV2 ---------------------------------------------------------------------------------------

MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1))          # expansion t, channels c, repeats n, stride s


def make_divisible(v, divisor=8):
    """torchvision's channel rounding: to a multiple of divisor, never more than 10% down."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def mobilenet_v2(num_classes=1000, image_size=224, loss=True, seed=0, width_mult=1.0, round_nearest=8,
                 dropout=0.2, dtype="float32"):
    """MobileNetV2 (Sandler et al. 2018), torchvision's: 3,504,872 parameters at 1000 classes."""
    g, x = _input("mobilenet_v2", image_size, seed, dtype)
    c_in = make_divisible(32 * width_mult, round_nearest)
    last = make_divisible(1280 * max(1.0, width_mult), round_nearest)
    h = nn.conv_bn_relu(g, x, c_in, 3, 2, 1, name="features.0.0", bn_name="features.0.1", act="relu6",
                        act_name="features.0.2")
    k = 1
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        out = make_divisible(c * width_mult, round_nearest)
        for i in range(n):
            h = nn.inverted_residual(g, h, out, s if i == 0 else 1, t, name=f"features.{k}")
            k += 1
    h = nn.conv_bn_relu(g, h, last, 1, name=f"features.{k}.0", bn_name=f"features.{k}.1", act="relu6",
                        act_name=f"features.{k}.2")
    return _head(g, h, num_classes, loss, dropout, name="classifier.1")


# --- GoogLeNet -----------------------------------------------------------------------------------------

GOOGLENET_BLOCKS = (  # name, (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), max pool (size) after
    ("inception3a", (64, 96, 128, 16, 32, 32), None), ("inception3b", (128, 128, 192, 32, 96, 64), 3),
    ("inception4a", (192, 96, 208, 16, 48, 64), None), ("inception4b", (160, 112, 224, 24, 64, 64), None),
    ("inception4c", (128, 128, 256, 24, 64, 64), None), ("inception4d", (112, 144, 288, 32, 64, 64), None),
    ("inception4e", (256, 160, 320, 32, 128, 128), 2),
    ("inception5a", (256, 160, 320, 32, 128, 128), None), ("inception5b", (384, 192, 384, 48, 128, 128), None))


def _basic_conv(g, x, out, size, name, stride=1, pad=0):
    """torchvision's BasicConv2d: conv (no bias) + BN (eps 0.001) + ReLU, named <name>.conv / <name>.bn."""
    return nn.conv_bn_relu(g, x, out, size, stride, pad, name=f"{name}.conv", bn_name=f"{name}.bn",
                           act_name=name, eps=1e-3)


def _inception(g, x, ch, name):
    """torchvision's Inception block: its "5x5" branch is a 3x3 conv (kept for its pretrained weights)."""
    c1, c3r, c3, c5r, c5, pp = ch
    b1 = _basic_conv(g, x, c1, 1, f"{name}.branch1")
    b2 = _basic_conv(g, _basic_conv(g, x, c3r, 1, f"{name}.branch2.0"), c3, 3, f"{name}.branch2.1", pad=1)
    b3 = _basic_conv(g, _basic_conv(g, x, c5r, 1, f"{name}.branch3.0"), c5, 3, f"{name}.branch3.1", pad=1)
    pool = g.maxpool(x, 3, 1, pad=1, ceil_mode=True, name=f"{name}.branch4.0")
    b4 = _basic_conv(g, pool, pp, 1, f"{name}.branch4.1")
    return g.concat([b1, b2, b3, b4], axis=1, name=name)


def googlenet(num_classes=1000, image_size=224, loss=True, seed=0, width_mult=1.0, dropout=0.2, dtype="float32"):
    """GoogLeNet as torchvision builds it (batch norm, ceil-mode pools, no auxiliary heads):
    6,624,904 parameters at 1000 classes."""
    def w(c):
        return max(1, int(round(c * width_mult)))
    g, x = _input("googlenet", image_size, seed, dtype)
    h = _basic_conv(g, x, w(64), 7, "conv1", stride=2, pad=3)
    h = g.maxpool(h, 3, 2, ceil_mode=True, name="maxpool1")
    h = _basic_conv(g, h, w(64), 1, "conv2")
    h = _basic_conv(g, h, w(192), 3, "conv3", pad=1)
    h = g.maxpool(h, 3, 2, ceil_mode=True, name="maxpool2")
    pools = 3
    for name, ch, pool in GOOGLENET_BLOCKS:
        h = _inception(g, h, tuple(w(c) for c in ch), name)
        if pool:
            h = g.maxpool(h, pool, 2, ceil_mode=True, name=f"maxpool{pools}")
            pools += 1
    return _head(g, h, num_classes, loss, dropout)


def googlenet_lrn(num_classes=1000, image_size=224, loss=True, seed=0, dropout=0.4, dtype="float32"):
    """GoogLeNet as the paper (Szegedy et al. 2014, Table 1) has it: convs with biases and ReLU, no batch
    norm, LRN (size 5, alpha 1e-4, beta 0.75) after the first pool and after conv 3x3, true 5x5 branch
    convs, ceil-mode max pools, no auxiliary heads; 6,998,552 parameters at 1000 classes."""
    g, x = _input("googlenet_lrn", image_size, seed, dtype)

    def cr(h, out, size, name, stride=1, pad=0):
        return nn.activation(g, nn.conv(g, h, out, size, stride, pad, bias=True, name=name), "relu", f"{name}.relu")
    h = cr(x, 64, 7, "conv1", 2, 3)
    h = g.lrn(g.maxpool(h, 3, 2, ceil_mode=True, name="pool1"), 5, 1e-4, 0.75, name="norm1")
    h = cr(cr(h, 64, 1, "conv2_reduce"), 192, 3, "conv2", pad=1)
    h = g.maxpool(g.lrn(h, 5, 1e-4, 0.75, name="norm2"), 3, 2, ceil_mode=True, name="pool2")
    pools = 3
    for name, (c1, c3r, c3, c5r, c5, pp), pool in GOOGLENET_BLOCKS:
        b1 = cr(h, c1, 1, f"{name}.1x1")
        b3 = cr(cr(h, c3r, 1, f"{name}.3x3_reduce"), c3, 3, f"{name}.3x3", pad=1)
        b5 = cr(cr(h, c5r, 1, f"{name}.5x5_reduce"), c5, 5, f"{name}.5x5", pad=2)
        bp = cr(g.maxpool(h, 3, 1, pad=1, ceil_mode=True, name=f"{name}.pool"), pp, 1, f"{name}.pool_proj")
        h = g.concat([b1, b3, b5, bp], axis=1, name=name)
        if pool:
            h = g.maxpool(h, 3, 2, ceil_mode=True, name=f"pool{pools}")
            pools += 1
    return _head(g, h, num_classes, loss, dropout, name="loss3.classifier")


# --- VGG-16 with batch norm, SqueezeNet 1.0 -------------------------------------------------------------

VGG16_BN_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(num_classes=1000, image_size=224, loss=True, seed=0, dropout=0.5, dtype="float32"):
    """VGG-16 with batch norm after every conv, torchvision's: 138,365,992 parameters at 1000 classes.
    Module indices as torchvision's features.<i> (conv, BN, ReLU per layer; the pools take one index)."""
    g, h = _input("vgg16_bn", image_size, seed, dtype)
    i = 0
    for c in VGG16_BN_CONFIG:
        if c == "M":
            h = g.maxpool(h, 2, name=f"features.{i}")
            i += 1
        else:
            h = nn.conv(g, h, c, 3, pad=1, bias=True, name=f"features.{i}")
            h = g.relu(nn.batchnorm2d(g, h, f"features.{i + 1}"), name=f"features.{i + 2}")
            i += 3
    h = g.flatten(nn.adaptive_avgpool(g, h, 7), name="flatten")
    for k in (0, 3):
        h = g.relu(nn.linear(g, h, 4096, name=f"classifier.{k}"), name=f"classifier.{k + 1}")
        if dropout:
            h = g.dropout(h, dropout, name=f"classifier.{k + 2}")
    return nn.finish(g, g.identity(nn.linear(g, h, num_classes, name="classifier.6"), name="logits"), loss)


def _fire(g, x, squeeze, e1, e3, name):
    s = g.relu(nn.conv(g, x, squeeze, 1, bias=True, name=f"{name}.squeeze"), name=f"{name}.squeeze_activation")
    a = g.relu(nn.conv(g, s, e1, 1, bias=True, name=f"{name}.expand1x1"), name=f"{name}.expand1x1_activation")
    b = g.relu(nn.conv(g, s, e3, 3, pad=1, bias=True, name=f"{name}.expand3x3"),
               name=f"{name}.expand3x3_activation")
    return g.concat([a, b], axis=1, name=name)


SQUEEZENET1_0 = {3: (16, 64, 64), 4: (16, 64, 64), 5: (32, 128, 128), 7: (32, 128, 128), 8: (48, 192, 192),
                 9: (48, 192, 192), 10: (64, 256, 256), 12: (64, 256, 256)}   # features.<i>: Fire(s, e1, e3)


def squeezenet1_0(num_classes=1000, image_size=224, loss=True, seed=0, dropout=0.5, dtype="float32"):
    """SqueezeNet 1.0 (Iandola et al. 2016), torchvision's: 1,248,424 parameters at 1000 classes."""
    g, x = _input("squeezenet1_0", image_size, seed, dtype)
    h = g.relu(nn.conv(g, x, 96, 7, 2, bias=True, name="features.0"), name="features.1")
    for i in range(2, 13):
        if i in SQUEEZENET1_0:
            h = _fire(g, h, *SQUEEZENET1_0[i], f"features.{i}")
        else:
            h = g.maxpool(h, 3, 2, ceil_mode=True, name=f"features.{i}")
    if dropout:
        h = g.dropout(h, dropout, name="classifier.0")
    h = g.relu(nn.conv(g, h, num_classes, 1, bias=True, name="classifier.1", init="normal"), name="classifier.2")
    return nn.finish(g, g.global_avgpool(h, name="logits"), loss)


MODELS = (resnet18, resnet34, resnet50, mobilenet_v2, googlenet, googlenet_lrn, vgg16_bn, squeezenet1_0)
