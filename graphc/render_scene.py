"""What graphc.rendering draws, before Graphviz: a scene of nodes (one per value), clusters (fused
kernels), edges (forward, gradient with its gate rule, saved value, update) and mirror partners, plus
the compaction that makes backward graphs readable (identity nodes elided, scalar constants written
into the node that reads them, gradient nodes titled dL/d<value>)."""
from __future__ import annotations

import re

import numpy as np

from graphc import shapes
from graphc.render_values import fmt_number, fmt_value

FORWARD_COLOR = "#2e7d32"      # green: forward edges and ops
BACKWARD_COLOR = "#c62828"     # red: gradient edges and backward ops
SAVED_COLOR = "#a8a8a8"        # grey dashed: a forward value read by a gradient rule
UPDATE_COLOR = "#6a1b9a"       # purple: optimizer updates

STYLE = {   # node kind -> Graphviz node attributes
    "input": dict(shape="invhouse", style="filled", fillcolor="#e3f2fd", color="#1565c0"),
    "param": dict(shape="cylinder", style="filled", fillcolor="#fff8e1", color="#ff8f00"),
    "state": dict(shape="cylinder", style="filled,dashed", fillcolor="#f5f5f5", color="#757575"),
    "const": dict(shape="note", style="filled", fillcolor="#f5f5f5", color="#757575", fontsize="8"),
    "forward": dict(shape="box", style="rounded,filled", fillcolor="#e8f5e9", color=FORWARD_COLOR),
    "backward": dict(shape="box", style="rounded,filled", fillcolor="#ffebee", color=BACKWARD_COLOR),
    "backward-const": dict(shape="note", style="filled", fillcolor="#ffebee", color=BACKWARD_COLOR,
                           fontsize="8"),
    "update": dict(shape="box", style="rounded,filled", fillcolor="#f3e5f5", color=UPDATE_COLOR),
    "ghost": dict(shape="box", style="rounded,dashed", color=SAVED_COLOR, fontcolor="#757575"),
}
EDGE = {    # edge kind -> Graphviz edge attributes
    "forward": dict(color=FORWARD_COLOR),
    "gradient": dict(color=BACKWARD_COLOR, fontcolor=BACKWARD_COLOR),
    "saved": dict(color=SAVED_COLOR, style="dashed", arrowsize="0.5", penwidth="0.7", constraint="false"),
    "update": dict(color=UPDATE_COLOR, fontcolor=UPDATE_COLOR),
}
#: the longest tooltip text (an array printed in full)
TOOLTIP_CHARS = 4000
#: a matrix value longer than this is written one row per line
WRAP = 30
_AUTO_NAME = re.compile(r"^(.*?)_?\d+$")


class Scene:
    """What will be drawn, independent of Graphviz: nodes, clusters, edges and mirror partners.
    Edges are [tail, head, kind, rule, value text]; a node's `info` (when it has one) is what its
    label is made from, so compaction can rewrite it."""

    def __init__(self):
        self.nodes = {}            # id -> dict(label, kind, role, cluster, output, tooltip, info)
        self.clusters = {}         # cid -> dict(label, role, nodes)
        self.edges = []            # [tail, head, kind, rule, value]
        self.partner = {}          # backward id -> forward id (ranked together in the mirror layout)

    def node(self, nid, label, kind, role, cluster=None, output=False, tooltip=None, info=None):
        self.nodes[nid] = dict(label=label, kind=kind, role=role, cluster=cluster, output=output,
                               tooltip=tooltip, info=info)
        if cluster is not None:
            self.clusters[cluster]["nodes"].append(nid)

    def edge(self, tail, head, kind, rule=None, value=None):
        self.edges.append([tail, head, kind, rule, value])


def short(s, n):
    s = str(s)
    return s if n is None or len(s) <= n else s[: max(1, n - 1)] + "\u2026"


def role_of(d):
    return d.get("role") or "forward"


def node_kind(d):
    op, role = d["op"], role_of(d)
    if op == "input":
        return "input"
    if op == "param":
        return "param" if (d.get("attrs") or {}).get("trainable", True) else "state"
    if op == "const":
        return "backward-const" if role == "backward" else "const"
    return role if role in ("backward", "update") else "forward"


def edge_kind(tail_role, head_role):
    if head_role == "update":
        return "update"
    if head_role == "backward":
        return "gradient" if tail_role == "backward" else "saved"
    return "forward"


def make_label(info, compact=False) -> str:
    """A node's label from its info: name and op (a gradient's title dL/d<value> when compact), shape,
    value, extras."""
    name, op, m = info["name"], info["op"], info["max_label"]
    if info.get("scalars"):                 # scalar constants written in: gt(., 0), mul(., 0.9)
        op = f"{op}({', '.join(info['scalars'])})"
    if compact and info.get("role") == "backward":
        title = f"dL/d{short(info['grad_of'], m)}" if info.get("grad_of") else \
            ("dL/dL (the seed)" if info.get("rule") == "seed" else None)
        lines = [title, op] if title else [op]
    else:
        lines = [short(name, m) if op == name else f"{short(name, m)}: {op}"]
        if info.get("grad_of") is not None:
            lines.append("dL/d" + short(info["grad_of"], m))
    lines.append(shapes.fmt(info["shape"]) if info.get("shape") is not None else "")
    if info.get("value") is not None:
        lines.append("= " + info["value"])
    lines.extend(info.get("extra") or ())
    return "\\n".join(line for line in lines if line)


def tooltip(name, op, shape, rule=None, array=None) -> str:
    """A node's SVG tooltip: name, op, shape, rule, and the whole array (up to TOOLTIP_CHARS)."""
    lines = [f"{name}: {op} {shapes.fmt(shape) if shape is not None else ''}".rstrip()]
    if rule:
        lines.append(f"rule {rule}")
    if array is not None:
        a = np.asarray(array)
        if a.dtype.kind in "fiub":
            text = np.array2string(a.astype(np.float64) if a.dtype.kind == "b" else a, precision=4,
                                   suppress_small=True, threshold=TOOLTIP_CHARS, max_line_width=100)
            lines.append(text if len(text) <= TOOLTIP_CHARS else text[:TOOLTIP_CHARS] + " ...")
    return "\n".join(lines)


def body_of(d):
    """The body of a node that has one (the fused op's attrs.body), as a list of dicts, else None."""
    attrs = d.get("attrs") or {}
    body = attrs.get("body")
    if isinstance(body, (list, tuple)) and body and all(isinstance(b, dict) for b in body):
        return list(body)
    return None


def _extra_annotations(op, inputs, vals):
    """The slides' extras: a softmax-cross-entropy node also shows the softmax output O."""
    if op == "softmax_cross_entropy" and inputs and inputs[0] in vals:
        z = np.asarray(vals[inputs[0]], dtype=np.float64)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return ["O = softmax = " + fmt_value(e / e.sum(axis=-1, keepdims=True))]
    return None


def _info(name, d, vals, max_label, show_values):
    v = vals.get(name) if show_values else None
    role = role_of(d)
    return dict(name=name, op=d.get("op", "?"), shape=d.get("shape"), role=role, rule=d.get("rule"),
                grad_of=d.get("grad_of") if role == "backward" else None, max_label=max_label,
                value=fmt_value(v, wrap=WRAP) if v is not None else None,
                extra=_extra_annotations(d["op"], d.get("inputs", ()), vals) if show_values else None)


def _add_cluster(sc, name, d, body, vals, opts, outputs):
    """The drawn body of a fused node: a cluster holding one node per body value."""
    role = role_of(d)
    attrs = d.get("attrs") or {}
    kernel = attrs.get("kernel") or attrs.get("pattern") or d["op"]
    cid = f"cluster_{name}"
    sc.clusters[cid] = dict(label=f"{kernel} ({name})" if kernel != name else kernel, role=role, nodes=[], name=name)
    ids = []
    for j, b in enumerate(body):
        bname = b.get("name") or f"{name}[{j}]"
        bid = f"{name}#{bname}"
        info = _info(bname, {**b, "role": role}, vals, opts["max_label"], vals is not None)
        info["grad_of"] = None
        sc.node(bid, make_label(info), role if role in STYLE else "forward", role, cluster=cid, info=info,
                tooltip=tooltip(bname, b.get("op", "?"), b.get("shape"), array=vals.get(bname) if vals else None))
        ids.append(bid)
    results = list(attrs.get("results") or [len(body) - 1])
    if name in outputs:
        sc.nodes[ids[results[0]]]["output"] = True
    return ids, results


def full_scene(g, vals, opts):
    """The scene of every value of g (a fused node's body as a cluster when opts["expand_fused"])."""
    nodes = g.nx.nodes
    sc = Scene()
    outputs = set(g.outputs)
    show_values = vals is not None
    vals = vals or {}
    out_id, role_ids, name_to_id, bodies = {}, {}, {}, {}
    for name in g.topo():
        d = nodes[name]
        body = body_of(d) if opts["expand_fused"] else None
        if body is not None:
            ids, results = _add_cluster(sc, name, d, body, vals if show_values else None, opts, outputs)
            for b, bid in zip(body, ids):
                name_to_id.setdefault(b.get("name") or bid, bid)
                role_ids[bid] = role_of(d)
            out_id[name] = ids[results[0]]      # several results: getitem nodes alias the others
            bodies[name] = (body, ids, results)
            continue
        if d["op"] == "getitem" and d["inputs"] and d["inputs"][0] in bodies:
            body, ids, results = bodies[d["inputs"][0]]
            idx = (d.get("attrs") or {}).get("index", 0)
            if 0 <= idx < len(results):
                out_id[name] = ids[results[idx]]
                if name in outputs:
                    sc.nodes[out_id[name]]["output"] = True
                continue
        info = _info(name, d, vals, opts["max_label"], show_values)
        sc.node(name, make_label(info), node_kind(d), role_of(d), output=name in outputs, info=info,
                tooltip=tooltip(name, d["op"], d.get("shape"), d.get("rule"), vals.get(name) if show_values else None))
        out_id[name] = name
        role_ids[name] = role_of(d)
        name_to_id.setdefault(name, name)

    def edge_text(kind, rule, src_value_name):
        if kind not in ("gradient", "update"):
            return None, None
        v = vals.get(src_value_name) if show_values else None
        return rule, (fmt_value(v, wrap=WRAP) if v is not None else None)

    for u, v, ed in g.nx.edges(data=True):
        if v in bodies or out_id.get(v) != v:        # into a fused body (below) or into an alias
            continue
        t = out_id.get(u)
        if t is None or (nodes[v]["op"] == "getitem" and u in bodies):
            continue
        kind = edge_kind(role_ids.get(t, role_of(nodes[u])), role_of(nodes[v]))
        sc.edge(t, v, kind, *edge_text(kind, ed.get("rule") or nodes[v].get("rule"), u))
    _fused_body_edges(g, sc, bodies, out_id, name_to_id, role_ids, edge_text)
    _mirror_partners(g, sc, out_id)
    return sc


def _fused_body_edges(g, sc, bodies, out_id, name_to_id, role_ids, edge_text):
    """Edges into and inside the drawn bodies of fused nodes."""
    nodes = g.nx.nodes
    for name, (body, ids, results) in bodies.items():
        d = nodes[name]
        outer = list(d["inputs"])
        covered = set()
        for j, b in enumerate(body):
            for inp in b.get("inputs", ()):
                if isinstance(inp, (list, tuple)) and len(inp) == 2 and inp[0] in ("in", "body"):
                    kind_, k = inp
                    if kind_ == "body":
                        sc.edge(ids[k], ids[j], edge_kind(role_ids[ids[k]], role_ids[ids[j]]))
                        continue
                    if k >= len(outer):
                        continue
                    src = outer[k]
                elif isinstance(inp, str):
                    src = inp
                else:
                    continue
                t = out_id.get(src) or name_to_id.get(src)
                if t is None:
                    continue
                covered.add(src)
                kind = edge_kind(role_ids.get(t, "forward"), role_ids[ids[j]])
                rule = (g.nx.edges[src, name].get("rule") if g.nx.has_edge(src, name) else None) or d.get("rule")
                sc.edge(t, ids[j], kind, *edge_text(kind, rule, src))
        for src in outer:                              # inputs no body node names: to the first one
            if src not in covered and out_id.get(src):
                t = out_id[src]
                kind = edge_kind(role_ids.get(t, "forward"), role_ids[ids[0]])
                sc.edge(t, ids[0], kind, *edge_text(kind, d.get("rule"), src))


def _mirror_partners(g, sc, out_id):
    """Each forward value ranked with the (first) backward node that is its gradient."""
    nodes = g.nx.nodes
    seen = set()
    for name in g.topo():
        d = nodes[name]
        if role_of(d) != "backward" or name not in sc.nodes:
            continue
        target = g.loss if d.get("rule") == "seed" else d.get("grad_of")
        if target is None or target not in out_id or target in seen:
            continue
        seen.add(target)
        sc.partner[name] = out_id[target]
    for name in g.outputs:           # a parameter is paired with its grad/<param> output, not a partial sum
        d = nodes[name]
        if d.get("rule") == "grad" and d.get("grad_of") in out_id and name in sc.nodes:
            target = out_id[d["grad_of"]]
            for k in [k for k, v in sc.partner.items() if v == target]:
                del sc.partner[k]
            sc.partner[name] = target


# ------------------------------------------------------------------------------------------ compaction

def compact(sc, g, vals=None):
    """Makes a scene of a backward graph readable: scalar constants are written into the nodes that
    read them (gt(., 0)) instead of drawn with edges across the picture, identity nodes are elided
    (their rule stays on the edge that replaces them, their output mark moves to their input), and
    backward nodes are titled dL/d<value> (the automatic names mul4, gt3 stay in the tooltips)."""
    _inline_scalars(sc, g, vals)
    _elide_identities(sc)
    for nid, n in sc.nodes.items():
        if n.get("info") is not None:
            n["label"] = make_label(n["info"], compact=True)


def _scalar_text(g, name, vals):
    d = g.nx.nodes[name]
    if d["op"] != "const" or tuple(d["shape"]) != ():
        return None
    v = (d.get("attrs") or {}).get("value")
    if v is None and vals:
        v = vals.get(name)
    try:
        return fmt_number(float(np.asarray(v)))
    except (TypeError, ValueError):
        return None


def _inline_scalars(sc, g, vals):
    scalars = {}
    for nid, n in sc.nodes.items():
        if n["cluster"] is None and nid in g.nx and not list(g.nx.predecessors(nid)):
            text = _scalar_text(g, nid, vals)
            if text is not None and all(e[1] in sc.nodes and sc.nodes[e[1]].get("info") for e in sc.edges
                                        if e[0] == nid):
                scalars[nid] = text
    for nid, text in scalars.items():
        for e in [e for e in sc.edges if e[0] == nid]:
            head = sc.nodes[e[1]]
            ins = list(g.nx.nodes[e[1]]["inputs"]) if e[1] in g.nx else []
            head["info"]["scalars"] = [scalars.get(i, "·") for i in ins] if ins else [text]
        del sc.nodes[nid]
        sc.partner.pop(nid, None)
    sc.edges = [e for e in sc.edges if e[0] not in scalars]


def _elide_identities(sc):
    ids = [n for n, d in sc.nodes.items() if d["cluster"] is None and (d.get("info") or {}).get("op") == "identity"]
    for nid in ids:
        into = [e for e in sc.edges if e[1] == nid]
        if len(into) != 1:
            continue
        src, _, kind_in, rule_in, value_in = into[0]
        rule_in = None if rule_in == "grad" else rule_in
        node = sc.nodes[nid]
        for e in [e for e in sc.edges if e[0] == nid]:
            e[0] = src
            e[3] = " \u2192 ".join(r for r in dict.fromkeys((rule_in, e[3])) if r) or None
        if node["output"]:
            sc.nodes[src]["output"] = True
        target = sc.nodes[src].get("info")
        if node["info"].get("grad_of") and target and not target.get("grad_of"):
            sc.nodes[src]["info"]["grad_of"] = node["info"]["grad_of"]
        partner = sc.partner.pop(nid, None)
        if partner is not None:
            for k in [k for k, v in sc.partner.items() if v == partner]:
                del sc.partner[k]
            sc.partner[src] = partner
        sc.edges = [e for e in sc.edges if e[1] != nid]
        del sc.nodes[nid]
