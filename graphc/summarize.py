"""gc.summary(graph): a table of every op with its output shape and trainable parameter count."""
import numpy as np

from graphc import shapes


def _count(shape):
    return int(np.prod(shape)) if shape else 1


def summary(graph) -> str:
    """Returns the table as text (print it). Parameters are counted where they are used, per op.
    Non-trainable state (batch norm's running statistics) is not a parameter, as torch's buffers are
    not: the total matches torch's parameter count, and a last line gives the state's size."""
    nodes = graph.nx.nodes
    trainable = set(graph.param_names)
    rows, total = [], 0
    for name in graph.topo():
        d = nodes[name]
        if d["op"] in ("param", "const"):
            continue
        n_params = sum(_count(nodes[i]["shape"]) for i in d["inputs"] if i in trainable)
        total += n_params
        rows.append((name, d["op"], shapes.fmt(d["shape"]), n_params))
    w = max([len(r[0]) for r in rows] + [4])
    wo = max([len(r[1]) for r in rows] + [2])
    ws = max([len(r[2]) for r in rows] + [12])
    lines = [f"graph {graph.name!r}", f"{'node':<{w}}  {'op':<{wo}}  {'output shape':<{ws}}  {'params':>12}",
             "-" * (w + wo + ws + 18)]
    for name, op, shp, n in rows:
        lines.append(f"{name:<{w}}  {op:<{wo}}  {shp:<{ws}}  {n:>12,}")
    lines.append("-" * (w + wo + ws + 18))
    lines.append(f"total trainable parameters: {total:,}")
    state = [n for n in graph.state_names if n not in trainable]
    if state:
        lines.append(f"non-trainable state: {sum(_count(nodes[n]['shape']) for n in state):,} values in "
                     f"{len(state)} arrays (trainable=False params: batch-norm running statistics, ...), not counted above")
    return "\n".join(lines)


def param_count(graph) -> int:
    return sum(_count(graph.nx.nodes[n]["shape"]) for n in graph.param_names)
