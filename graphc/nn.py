"""Layer-style helpers on top of the gate API: blocks that create their own parameters."""


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
