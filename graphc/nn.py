"""Layer-style helpers on top of the gate API: blocks that create their own parameters."""


def finish(g, logits, loss=True):
    """The zoo's head: with loss, an int64 "labels" input and the output "loss" (softmax cross-entropy,
    mean over the batch); else the output is the logits."""
    if loss:
        y = g.input("labels", (None,), dtype="int64")
        g.output(g.softmax_cross_entropy(logits, y, name="loss"))
    else:
        g.output(logits)
    return g


def conv2d(g, x, out_channels, size, stride=1, pad=0, name="conv", act="relu", init="he", bias=True):
    """conv (+ bias) (+ relu): parameters `<name>.w` (K, C, KH, KW) and `<name>.b` (K,)."""
    kh, kw = (size, size) if isinstance(size, int) else size
    w = g.param(f"{name}.w", (out_channels, x.shape[1], kh, kw), init=init)
    b = g.param(f"{name}.b", (out_channels,), init="zeros") if bias else None
    y = g.conv(x, w, b, stride=stride, pad=pad, name=name)
    return g.relu(y, name=f"{name}.relu") if act == "relu" else y


def dense(g, x, out_features, name="fc", act=None, init="he", bias=True):
    """x @ w.T + b (+ relu): parameters `<name>.w` (out, in) and `<name>.b` (out,)."""
    w = g.param(f"{name}.w", (out_features, x.shape[1]), init=init)
    b = g.param(f"{name}.b", (out_features,), init="zeros") if bias else None
    y = g.dense(x, w, b, name=name)
    return g.relu(y, name=f"{name}.relu") if act == "relu" else y


def residual_block(g, x, channels, stride=1, name="res"):
    """ResNet basic block: conv3x3-relu-conv3x3 plus the skip path (a 1x1 projection when the shape
    changes), joined by an add gate; the fork becomes a copy gate when differentiated."""
    h = conv2d(g, x, channels, 3, stride=stride, pad=1, name=f"{name}.conv1")
    h = conv2d(g, h, channels, 3, pad=1, name=f"{name}.conv2", act=None)
    skip = x
    if stride != 1 or x.shape[1] != channels:
        skip = conv2d(g, x, channels, 1, stride=stride, name=f"{name}.proj", act=None)
    return g.relu(g.add(h, skip, name=f"{name}.join"), name=f"{name}.out")


def inception_block(g, x, c1, c3r, c3, c5r, c5, pool_proj, name="inception"):
    """GoogLeNet Inception block: parallel 1x1, 1x1->3x3, 1x1->5x5 and 3x3-maxpool->1x1 branches,
    concatenated on channels."""
    b1 = conv2d(g, x, c1, 1, name=f"{name}.1x1")
    b3 = conv2d(g, conv2d(g, x, c3r, 1, name=f"{name}.3x3r"), c3, 3, pad=1, name=f"{name}.3x3")
    b5 = conv2d(g, conv2d(g, x, c5r, 1, name=f"{name}.5x5r"), c5, 5, pad=2, name=f"{name}.5x5")
    bp = conv2d(g, g.maxpool(x, 3, 1, pad=1, name=f"{name}.pool"), pool_proj, 1, name=f"{name}.poolproj")
    return g.concat([b1, b3, b5, bp], axis=1, name=f"{name}.concat")


# --- the CNN op set's layers, with torch's parameter names ------------------------------------------
# These helpers name parameters as torch.nn modules do (`<name>.weight`, `<name>.bias`,
# `<name>.running_mean`, `<name>.running_var`), so the zoo's torchvision architectures have exactly
# torchvision's state_dict keys and can load its weights by name.

def conv(g, x, out_channels, size, stride=1, pad=0, dilation=1, groups=1, bias=False, name="conv", init="he"):
    """torch.nn.Conv2d: `<name>.weight` (K, C // groups, KH, KW) and, with bias, `<name>.bias`."""
    kh, kw = (size, size) if isinstance(size, int) else size
    w = g.param(f"{name}.weight", (out_channels, x.shape[1] // groups, kh, kw), init=init)
    b = g.param(f"{name}.bias", (out_channels,), init="zeros") if bias else None
    return g.conv(x, w, b, stride=stride, pad=pad, dilation=dilation, groups=groups, name=name)


def linear(g, x, out_features, name="fc", bias=True):
    """torch.nn.Linear with its default initialisation: `<name>.weight` (out, in), `<name>.bias`."""
    w = g.param(f"{name}.weight", (out_features, x.shape[-1]), init="torch")
    b = g.param(f"{name}.bias", (out_features,), init="torch", scale=x.shape[-1]) if bias else None
    return g.dense(x, w, b, name=name)


def batchnorm2d(g, x, name="bn", eps=1e-5, momentum=0.1):
    """torch.nn.BatchNorm2d (or 1d on (N, C) input): `<name>.weight` (gamma, ones), `<name>.bias` (beta,
    zeros) and the running statistics `<name>.running_mean` / `.running_var` (graph state)."""
    c = x.shape[1]
    return g.batchnorm(x, g.param(f"{name}.weight", (c,), init="ones"), g.param(f"{name}.bias", (c,), init="zeros"),
                       g.param(f"{name}.running_mean", (c,), init="zeros", trainable=False),
                       g.param(f"{name}.running_var", (c,), init="ones", trainable=False),
                       eps=eps, momentum=momentum, name=name)


def activation(g, x, act, name):
    """act: "relu", "relu6" (= clip(x, 0, 6)) or None."""
    if act is None:
        return x
    if act == "relu":
        return g.relu(x, name=name)
    if act == "relu6":
        return g.clip(x, 0.0, 6.0, name=name)
    from graphc.errors import GraphError
    raise GraphError(f"unknown activation {act!r}; use 'relu', 'relu6' or None")


def conv_bn_relu(g, x, out_channels, size, stride=1, pad=0, groups=1, dilation=1, name="conv", bn_name=None,
                 act="relu", act_name=None, eps=1e-5):
    """conv (no bias) -> batch norm -> activation ("relu", "relu6" or None), torchvision's
    Conv2dNormActivation. Nodes `name`, `bn_name` (default `<name>.bn`), `act_name`."""
    bn_name = bn_name or f"{name}.bn"
    h = conv(g, x, out_channels, size, stride, pad, dilation, groups, name=name)
    h = batchnorm2d(g, h, bn_name, eps=eps)
    return activation(g, h, act, act_name or f"{bn_name}.{act}")


def depthwise_separable(g, x, out_channels, stride=1, name="dws", act="relu"):
    """MobileNet (v1) block: depthwise 3x3 conv (groups = C) + BN + act, then pointwise 1x1 conv + BN + act."""
    h = conv_bn_relu(g, x, x.shape[1], 3, stride, 1, groups=x.shape[1], name=f"{name}.dw", act=act)
    return conv_bn_relu(g, h, out_channels, 1, name=f"{name}.pw", act=act)


def inverted_residual(g, x, out_channels, stride, expand_ratio, name="ir"):
    """MobileNetV2's block, as torchvision's InvertedResidual (its module names): 1x1 expansion + BN +
    ReLU6 (when expand_ratio != 1), depthwise 3x3 + BN + ReLU6, linear 1x1 projection + BN; plus the
    input when the stride is 1 and the channels match."""
    inp = x.shape[1]
    hidden = int(round(inp * expand_ratio))
    h, k = x, 0
    if expand_ratio != 1:
        h = conv_bn_relu(g, h, hidden, 1, name=f"{name}.conv.0.0", bn_name=f"{name}.conv.0.1", act="relu6",
                         act_name=f"{name}.conv.0.2")
        k = 1
    h = conv_bn_relu(g, h, hidden, 3, stride, 1, groups=hidden, name=f"{name}.conv.{k}.0",
                     bn_name=f"{name}.conv.{k}.1", act="relu6", act_name=f"{name}.conv.{k}.2")
    h = conv_bn_relu(g, h, out_channels, 1, name=f"{name}.conv.{k + 1}", bn_name=f"{name}.conv.{k + 2}", act=None)
    if stride == 1 and inp == out_channels:
        h = g.add(x, h, name=f"{name}.join")
    return h


def _downsample(g, x, out_channels, stride, name):
    if stride == 1 and x.shape[1] == out_channels:
        return x
    return conv_bn_relu(g, x, out_channels, 1, stride, name=f"{name}.downsample.0",
                        bn_name=f"{name}.downsample.1", act=None)


def basic_block(g, x, planes, stride=1, name="block"):
    """ResNet-18/34's block, torchvision's BasicBlock: conv3x3 (stride) + BN + ReLU, conv3x3 + BN, plus the
    input (or its 1x1 conv + BN downsample), ReLU."""
    h = conv_bn_relu(g, x, planes, 3, stride, 1, name=f"{name}.conv1", bn_name=f"{name}.bn1",
                     act_name=f"{name}.relu1")
    h = conv_bn_relu(g, h, planes, 3, 1, 1, name=f"{name}.conv2", bn_name=f"{name}.bn2", act=None)
    return g.relu(g.add(h, _downsample(g, x, planes, stride, name), name=f"{name}.join"), name=f"{name}.out")


def bottleneck(g, x, planes, stride=1, name="block", expansion=4):
    """ResNet-50's block, torchvision's Bottleneck (v1.5: the stride on the 3x3): 1x1 + BN + ReLU,
    3x3 (stride) + BN + ReLU, 1x1 to planes * expansion + BN, plus the (downsampled) input, ReLU."""
    h = conv_bn_relu(g, x, planes, 1, name=f"{name}.conv1", bn_name=f"{name}.bn1", act_name=f"{name}.relu1")
    h = conv_bn_relu(g, h, planes, 3, stride, 1, name=f"{name}.conv2", bn_name=f"{name}.bn2",
                     act_name=f"{name}.relu2")
    h = conv_bn_relu(g, h, planes * expansion, 1, name=f"{name}.conv3", bn_name=f"{name}.bn3", act=None)
    skip = _downsample(g, x, planes * expansion, stride, name)
    return g.relu(g.add(h, skip, name=f"{name}.join"), name=f"{name}.out")


def adaptive_avgpool(g, x, out_hw, name="avgpool"):
    """torch's AdaptiveAvgPool2d: output bin i averages rows floor(i H / Ho) .. ceil((i + 1) H / Ho) - 1.
    (1, 1) is the global average; an exact divisor is an ordinary average pool; other sizes are two
    constant averaging matrices applied by batched matmul, A_h @ x @ A_w^T."""
    import numpy as np
    oh, ow = (out_hw, out_hw) if isinstance(out_hw, int) else tuple(out_hw)
    h, w = x.shape[2], x.shape[3]
    if (oh, ow) == (1, 1):
        return g.reshape(g.global_avgpool(x, name=f"{name}.mean"), (x.shape[0], x.shape[1], 1, 1), name=name)
    if (oh, ow) == (h, w):
        return x
    if h % oh == 0 and w % ow == 0:
        return g.avgpool(x, (h // oh, w // ow), name=name)

    def bins(n, o):
        a = np.zeros((o, n))
        for i in range(o):
            lo, hi = (i * n) // o, -(-((i + 1) * n) // o)
            a[i, lo:hi] = 1.0 / (hi - lo)
        return a
    rows = g.matmul(g.const(bins(h, oh)), x, name=f"{name}.rows")
    return g.matmul(rows, g.const(bins(w, ow)), trans_b=True, name=name)
