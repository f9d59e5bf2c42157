"""gc.summary(graph): a table of every op with its output shape, trainable parameters (count and bytes),
multiply-accumulates and activation memory, as torchinfo prints them.

Per image (the batch dimension set to 1): MACs count the multiply-accumulates of conv, matmul and their
gradient ops (FLOPs / 2); activations are the bytes of each op's output. Parameters are counted where
a forward op uses them; a backward graph's gradient ops read the same parameters but add none, so
``--backward`` reports the forward totals.
"""
import numpy as np

from graphc import shapes

#: ops whose FLOPs are multiply-accumulates (2 FLOPs each)
MAC_OPS = ("conv", "matmul", "conv_dx", "conv_dw")


def _count(shape):
    return int(np.prod(shape)) if shape else 1


def _per_image(shape):
    return tuple(1 if isinstance(d, str) else d for d in shape)


def macs(graph, name) -> int:
    """Multiply-accumulates of node `name` for one image (0 for ops that have none)."""
    from graphc import ops as optable
    nodes = graph.nx.nodes
    d = nodes[name]
    ins = [_per_image(nodes[i]["shape"]) for i in d["inputs"]]
    out = _per_image(d["shape"])
    if d["op"] == "fused":
        body = d["attrs"]["body"]
        total = 0
        for b in body:
            if b["op"] in MAC_OPS:
                try:
                    bins = [ins[k] if kind == "in" else _per_image(body[k]["shape"]) for kind, k in b["inputs"]]
                    total += optable.OPS[b["op"]].flops(bins, _per_image(b["shape"]), b.get("attrs", {})) // 2
                except (KeyError, TypeError, ValueError, IndexError):
                    pass                # a body the table cannot count: no MACs shown for it
        return int(total)
    if d["op"] not in MAC_OPS:
        return 0
    return int(optable.OPS[d["op"]].flops(ins, out, d["attrs"]) // 2)


def fmt_bytes(n) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _itemsize(graph, name):
    dt = graph.nx.nodes[name]["dtype"]
    return np.dtype(dt).itemsize


def summary(graph) -> str:
    """Returns the table as text (print it). Parameters are counted where forward ops use them.
    Non-trainable state (batch norm's running statistics) is not a parameter, as torch's buffers are
    not: the total matches torch's parameter count, and a last line gives the state's size."""
    nodes = graph.nx.nodes
    trainable = set(graph.param_names)
    rows = []
    for name in graph.topo():
        d = nodes[name]
        if d["op"] in ("param", "const"):
            continue
        forward = (d.get("role") or "forward") == "forward"
        ps = [i for i in d["inputs"] if i in trainable] if forward else []
        n_params = sum(_count(nodes[i]["shape"]) for i in ps)
        p_bytes = sum(_count(nodes[i]["shape"]) * _itemsize(graph, i) for i in ps)
        act = _count(_per_image(d["shape"])) * _itemsize(graph, name) if d["op"] != "input" else 0
        rows.append((name, d["op"], shapes.fmt(d["shape"]), n_params, fmt_bytes(p_bytes) if p_bytes else "-",
                     f"{macs(graph, name):,}", fmt_bytes(act) if act else "-"))
    heads = ("node", "op", "output shape", "params", "param bytes", "MACs", "activations")
    widths = [max([len(h)] + [len(str(r[i]) if i != 3 else f"{r[i]:,}") for r in rows]) for i, h in enumerate(heads)]
    widths[3] = max(widths[3], 12)
    fmt_row = "{:<{}}  {:<{}}  {:<{}}  {:>{}}  {:>{}}  {:>{}}  {:>{}}"

    def line(cells):
        return fmt_row.format(*[x for c, w in zip(cells, widths) for x in (c, w)]).rstrip()
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [f"graph {graph.name!r} (MACs and activations per image)", line(heads), rule]
    out += [line((n, op, shp, f"{c:,}", pb, m, a)) for n, op, shp, c, pb, m, a in rows]
    out.append(rule)
    total = sum(_count(nodes[n]["shape"]) for n in trainable)
    total_bytes = sum(_count(nodes[n]["shape"]) * _itemsize(graph, n) for n in trainable)
    out.append(f"total trainable parameters: {total:,}")
    out.append(f"parameter bytes: {total_bytes:,} ({fmt_bytes(total_bytes)})")
    total_macs = sum(macs(graph, n) for n in graph.topo() if nodes[n]["op"] not in ("param", "const", "input"))
    out.append(f"MACs per image: {total_macs:,} ({total_macs / 1e6:.2f} M)")
    acts = sum(_count(_per_image(nodes[n]["shape"])) * _itemsize(graph, n) for n in graph.topo()
               if nodes[n]["op"] not in ("param", "const", "input"))
    out.append(f"activation memory per image: {fmt_bytes(acts)} (every op's output; a compiled executable "
               "reuses buffers: see graphc bench's memory plan)")
    state = [n for n in graph.state_names if n not in trainable]
    if state:
        out.append(f"non-trainable state: {sum(_count(nodes[n]['shape']) for n in state):,} values in "
                   f"{len(state)} arrays (trainable=False params: batch-norm running statistics, ...), "
                   "not counted above")
    return "\n".join(out)


def param_count(graph) -> int:
    return sum(_count(graph.nx.nodes[n]["shape"]) for n in graph.param_names)
