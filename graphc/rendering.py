"""gc.render(graph, path): the graph drawn with Graphviz, as the course slides draw it.

    gc.render(g, "lenet5.svg")                                  # forward: green edges
    gc.render(g, "lenet5_backward.svg", backward=True)          # + backward beside it: red edges, each
                                                                #   labelled with its gate rule
    gc.render(seed_cnn, "trace.svg", backward=True,
              values={"x": SEED_X, "labels": SEED_LABELS})      # every value and gradient written on
    gc.render(vgg16, "vgg16.svg", backward=True, collapse=True) # repeated blocks merged: conv3_[1-3] x3

What is drawn
-------------
* One box per value (graphc has one value per node): its op, its name and its output shape. Inputs are
  blue houses, parameters amber cylinders (optimizer state dashed), constants grey notes, forward ops
  green boxes, backward (gradient) ops red boxes, optimizer updates purple; graph outputs have a double
  border. A backward node that is the gradient of a value also says so (``dL/dh``).
* Forward edges are green. Gradient edges (out of a backward node) are red and labelled with the gate
  rule on the edge (the ``rule`` attribute the autodiff pass puts on every edge into a backward node:
  ``add:distribute``, ``matmul:swap``, ``copy:add``, ``max:route``, ``conv:dW``, ``pool:route``, ...).
  A forward value read by a gradient rule (the other input of a swap multiplier, the saved input of a
  max router) is joined to it by a dashed grey edge that does not constrain the layout.
* Any node with a ``body`` (the ``fused`` op: attrs ``pattern``, ``body``, ``results``; see
  graphc.ops.fused) is a cluster named after its kernel pattern, holding its body nodes under their
  original names, so a reader sees which gates became which kernel. ``getitem`` nodes that pick a
  result of a fused node are drawn as that result inside the cluster.

Layouts (``backward=True`` or a graph that already holds backward nodes)
-------------------------------------------------------------------------
* ``mirror`` (default): the backward graph mirrored beside the forward one; each gradient node is
  ranked with the value it is the gradient of (forward on the left/top, its gradient to its right/below)
  and gradient edges run back the way the forward ones came, as on the slides.
* ``separate``: forward and backward in two clusters, each flowing in its own direction.
* ``backward-only``: just the backward nodes; the forward values they read appear as dashed ghosts.

Rank direction defaults to LR for short graphs (the slides' left-to-right) and TB for long ones.
``collapse=True`` merges each layer (``conv3_1``, ``conv3_1.w``, ``conv3_1.b``, ``conv3_1.relu``) into
one node, its backward into one ``d conv3_1`` node, and runs of identical consecutive layers into one
(``conv3_[1-3] x3``), so VGG16's backward fits a page.

Output
------
``render`` returns the DOT source and, given a path, writes it in the format named by ``format`` or the
extension: svg, png, pdf (laid out by Graphviz's ``dot`` engine: pygraphviz in-process when installed,
else the ``dot`` program), dot (the source), json (networkx node-link data with every attribute). When
no layout engine can be found the .dot file is written next to the target and a GraphError says how
to get one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict

import numpy as np

from graphc import shapes
from graphc.errors import GraphError
from graphc.files import atomic_write, check_writable
from graphc.render_values import compute_values, example_feeds, fmt_number, fmt_value, to_json  # noqa: F401

FORMATS = ("svg", "png", "pdf", "dot", "json")
LAYOUTS = ("mirror", "separate", "backward-only")

FORWARD_COLOR = "#2e7d32"      # green: forward edges and ops
BACKWARD_COLOR = "#c62828"     # red: gradient edges and backward ops
SAVED_COLOR = "#9e9e9e"        # grey dashed: a forward value read by a gradient rule
UPDATE_COLOR = "#6a1b9a"       # purple: optimizer updates
ENGINE_HINT = ("install a Graphviz layout engine: `pip install pygraphviz` (bundles Graphviz, renders "
               "in-process) or `apt-get install graphviz` (the `dot` program)")

_STYLE = {   # node kind -> Graphviz node attributes
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
_EDGE = {    # edge kind -> Graphviz edge attributes
    "forward": dict(color=FORWARD_COLOR),
    "gradient": dict(color=BACKWARD_COLOR, fontcolor=BACKWARD_COLOR),
    "saved": dict(color=SAVED_COLOR, style="dashed", arrowsize="0.6", constraint="false"),
    "update": dict(color=UPDATE_COLOR, fontcolor=UPDATE_COLOR),
}


# ------------------------------------------------------------------------------------------ the scene

class _Scene:
    """What will be drawn, independent of Graphviz: nodes, clusters, edges and mirror partners."""

    def __init__(self):
        self.nodes = {}            # id -> dict(label, kind, role, cls, cluster, output)
        self.clusters = {}         # cid -> dict(label, role, nodes)
        self.edges = []            # (tail, head, kind, label)
        self.partner = {}          # backward id -> forward id (ranked together in the mirror layout)

    def node(self, nid, label, kind, role, cluster=None, output=False, tooltip=None):
        self.nodes[nid] = dict(label=label, kind=kind, role=role, cluster=cluster, output=output,
                               tooltip=tooltip)
        if cluster is not None:
            self.clusters[cluster]["nodes"].append(nid)


def _short(s, n):
    s = str(s)
    return s if n is None or len(s) <= n else s[: max(1, n - 1)] + "\u2026"


def _role(d):
    return d.get("role") or "forward"


def _node_kind(d):
    op, role = d["op"], _role(d)
    if op == "input":
        return "input"
    if op == "param":
        return "param" if (d.get("attrs") or {}).get("trainable", True) else "state"
    if op == "const":
        return "backward-const" if role == "backward" else "const"
    return role if role in ("backward", "update") else "forward"


def _edge_kind(tail_role, head_role):
    if head_role == "update":
        return "update"
    if head_role == "backward":
        return "gradient" if tail_role == "backward" else "saved"
    return "forward"


def _label(name, op, shape, max_label, grad_of=None, value=None, extra=None):
    lines = [_short(name, max_label) if op == name else f"{_short(name, max_label)}: {op}"]
    if grad_of is not None:
        lines.append("dL/d" + _short(grad_of, max_label))
    lines.append(shapes.fmt(shape) if shape is not None else "")
    if value is not None:
        lines.append("= " + value)
    if extra:
        lines.extend(extra)
    return "\\n".join(line for line in lines if line)


def _body(d):
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


def _full_scene(g, vals, opts):
    nodes = g.nx.nodes
    sc = _Scene()
    outputs = set(g.outputs)
    max_label = opts["max_label"]
    show_values = vals is not None
    out_id = {}                     # graph value name -> drawn node id
    role_of = {}                    # drawn id -> role
    name_to_id = {}                 # any original (body) name -> drawn id
    bodies = {}
    for name in g.topo():
        d = nodes[name]
        body = _body(d) if opts["expand_fused"] else None
        if body is not None:
            bodies[name] = body
            role = _role(d)
            attrs = d.get("attrs") or {}
            kernel = attrs.get("kernel") or attrs.get("pattern") or d["op"]
            cid = f"cluster_{name}"
            sc.clusters[cid] = dict(label=f"{kernel} ({name})" if kernel != name else kernel, role=role,
                                    nodes=[], name=name)
            ids = []
            for j, b in enumerate(body):
                bname = b.get("name") or f"{name}[{j}]"
                bid = f"{name}#{bname}"
                v = vals.get(bname) if show_values else None
                sc.node(bid, _label(bname, b.get("op", "?"), b.get("shape"), max_label,
                                    value=fmt_value(v) if v is not None else None),
                        role if role in _STYLE else "forward", role, cluster=cid)
                ids.append(bid)
                name_to_id.setdefault(bname, bid)
                role_of[bid] = role
            results = list(attrs.get("results") or [len(body) - 1])
            out_id[name] = ids[results[0]]      # several results: getitem nodes alias the others
            bodies[name] = (body, ids, results)
            if name in outputs:
                sc.nodes[out_id[name]]["output"] = True
            continue
        if d["op"] == "getitem" and d["inputs"] and d["inputs"][0] in bodies:
            body, ids, results = bodies[d["inputs"][0]]
            idx = (d.get("attrs") or {}).get("index", 0)
            if 0 <= idx < len(results):
                out_id[name] = ids[results[idx]]
                if name in outputs:
                    sc.nodes[out_id[name]]["output"] = True
                continue
        v = vals.get(name) if show_values else None
        extra = _extra_annotations(d["op"], d["inputs"], vals) if show_values else None
        grad_of = d.get("grad_of") if _role(d) == "backward" else None
        sc.node(name, _label(name, d["op"], d.get("shape"), max_label, grad_of=grad_of,
                             value=fmt_value(v) if v is not None else None, extra=extra),
                _node_kind(d), _role(d), output=name in outputs,
                tooltip=f"rule {d['rule']}" if d.get("rule") else None)
        out_id[name] = name
        role_of[name] = _role(d)
        name_to_id.setdefault(name, name)

    def edge_label(kind, rule, src_value_name):
        if kind not in ("gradient", "update"):
            return None
        parts = [rule] if rule else []
        if show_values and src_value_name in vals:
            parts.append(fmt_value(vals[src_value_name]))
        return "\\n".join(parts) or None

    # edges of plain nodes
    for u, v, ed in g.nx.edges(data=True):
        if v in bodies or out_id.get(v) != v:        # into a fused body (below) or into an alias
            continue
        t = out_id.get(u)
        if t is None:
            continue
        if nodes[v]["op"] == "getitem" and u in bodies:
            continue
        kind = _edge_kind(role_of.get(t, _role(nodes[u])), _role(nodes[v]))
        rule = ed.get("rule") or nodes[v].get("rule")
        sc.edges.append((t, v, kind, edge_label(kind, rule, u)))
    _fused_body_edges(g, sc, bodies, out_id, name_to_id, role_of, edge_label)
    _mirror_partners(g, sc, out_id)
    return sc


def _fused_body_edges(g, sc, bodies, out_id, name_to_id, role_of, edge_label):
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
                        sc.edges.append((ids[k], ids[j], _edge_kind(role_of[ids[k]], role_of[ids[j]]), None))
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
                kind = _edge_kind(role_of.get(t, "forward"), role_of[ids[j]])
                rule = (g.nx.edges[src, name].get("rule") if g.nx.has_edge(src, name) else None) or d.get("rule")
                sc.edges.append((t, ids[j], kind, edge_label(kind, rule, src)))
        for src in outer:                              # inputs no body node names: to the first one
            if src not in covered and out_id.get(src):
                t = out_id[src]
                kind = _edge_kind(role_of.get(t, "forward"), role_of[ids[0]])
                sc.edges.append((t, ids[0], kind, edge_label(kind, d.get("rule"), src)))


def _mirror_partners(g, sc, out_id):
    """Each forward value ranked with the (first) backward node that is its gradient."""
    nodes = g.nx.nodes
    seen = set()
    for name in g.topo():
        d = nodes[name]
        if _role(d) != "backward" or name not in sc.nodes:
            continue
        target = g.loss if d.get("rule") == "seed" else d.get("grad_of")
        if target is None or target not in out_id or target in seen:
            continue
        seen.add(target)
        sc.partner[name] = out_id[target]
    _prefer_grad_partners(g, sc, out_id)


def _prefer_grad_partners(g, sc, out_id):
    """A parameter is paired with its grad/<param> output rather than an intermediate sum."""
    nodes = g.nx.nodes
    for name in g.outputs:
        d = nodes[name]
        if d.get("rule") == "grad" and d.get("grad_of") in out_id and name in sc.nodes:
            target = out_id[d["grad_of"]]
            for k in [k for k, v in sc.partner.items() if v == target]:
                del sc.partner[k]
            sc.partner[name] = target


# ------------------------------------------------------------------------------------------ collapse

_STEM = re.compile(r"^(.*?)(\d+)$")


def _layers(g):
    """Forward value -> its layer name; backward/update node -> the forward layer whose rule made it."""
    nodes = g.nx.nodes
    topo = g.topo()
    fwd = [n for n in topo if _role(nodes[n]) == "forward"]
    fset = set(fwd)
    layer = {}
    for n in fwd:
        parts = n.split(".")
        layer[n] = n
        for k in range(1, len(parts)):
            p = ".".join(parts[:k])
            if p in fset:
                layer[n] = p
                break
    for n in fwd:                  # unprefixed sources with one consumer join it
        d = nodes[n]
        if layer[n] == n and d["op"] in ("param", "const"):
            users = [u for u in g.nx.successors(n) if u in fset]
            if len(users) == 1:
                layer[n] = layer[users[0]]
    for n in topo:
        d = nodes[n]
        if n in fset or d["op"] == "const":
            continue
        L = None
        target = g.loss if d.get("rule") == "seed" else d.get("grad_of")
        if d.get("rule") == "grad" and target in layer:
            L = layer[target]
        elif target in fset:        # made by the gradient rule of the forward node that reads `target`
            users = [u for u in g.nx.successors(target) if u in fset]
            L = layer[users[0]] if len(users) == 1 else layer[target]
        if L is None:               # else: part of the rule that made its (backward, then forward) inputs
            ins = [i for i in d["inputs"] if nodes[i]["op"] != "const"]
            L = next((layer[i] for i in ins if i in layer and i not in fset), None) or \
                next((layer[i] for i in ins if i in fset), None)
        layer[n] = L if L is not None else n
    for n in topo:                  # constants of the backward/update graph join their first user
        if n not in layer:
            users = sorted(g.nx.successors(n), key=topo.index)
            layer[n] = layer.get(users[0], n) if users else n
    return layer


def _layer_runs(nodes, groups, gedges, pos):
    """Runs of identical consecutive layers (conv3_1, conv3_2, conv3_3 -> one run, drawn conv3_[1-3] x3),
    as lists of group keys."""
    def signature(key):
        return tuple(sorted(nodes[n]["op"] for n in groups[key]))

    runs = []
    for role in ("forward", "backward", "update"):
        keys = sorted((k for k in groups if k[0] == role), key=lambda k: pos[groups[k][0]])
        cur = []
        for k in keys:
            m = _STEM.match(k[1])
            if cur:
                m0 = _STEM.match(cur[-1][1])
                step = (int(m.group(2)) - int(m0.group(2))) if (m and m0) else None
                first = _STEM.match(cur[0][1])
                direction = None if len(cur) < 2 else int(_STEM.match(cur[1][1]).group(2)) - int(first.group(2))
                if (m and m0 and m.group(1) == m0.group(1) and step in (1, -1)
                        and (direction is None or step == direction)
                        and signature(k) == signature(cur[-1]) and (cur[-1], k) in gedges):
                    cur.append(k)
                    continue
                runs.append(cur)
            cur = [k]
        if cur:
            runs.append(cur)
    return runs


def _collapsed_scene(g, vals, opts):
    nodes = g.nx.nodes
    topo = g.topo()
    pos = {n: i for i, n in enumerate(topo)}
    layer = _layers(g)
    groups = defaultdict(list)                      # (role, layer) -> members in topo order
    member_of = {}
    for n in topo:                  # a constant joins its first user's group (a shared 0 is no layer)
        role = _role(nodes[n])
        if nodes[n]["op"] == "const":
            users = sorted(g.nx.successors(n), key=pos.get)
            if users:
                role = _role(nodes[users[0]])
        member_of[n] = (role, layer[n])
        groups[member_of[n]].append(n)
    gedges = set()
    for u, v in g.nx.edges():
        a, b = member_of[u], member_of[v]
        if a != b:
            gedges.add((a, b))
            gedges.add((b, a))

    runs = _layer_runs(nodes, groups, gedges, pos)
    sc = _Scene()
    gid = {}                                         # group key -> drawn id
    fwd_by_name = {}
    pending_partner = []
    params = set(g.state_names)
    for run in runs:
        role = run[0][0]
        if len(run) > 1:
            m0, m1 = _STEM.match(run[0][1]), _STEM.match(run[-1][1])
            lo, hi = sorted((int(m0.group(2)), int(m1.group(2))))
            base = f"{m0.group(1)}[{lo}-{hi}] x{len(run)}"
        else:
            base = run[0][1]
        members = [n for k in run for n in groups[k]]
        nid = ("d " if role == "backward" else "update " if role == "update" else "") + base
        for k in run:
            gid[k] = nid
        last = groups[run[-1]]
        leaving = [n for n in last if any(member_of[s] not in run for s in g.nx.successors(n))]
        exit_node = (leaving or [n for n in last if n in g.outputs] or last)[-1]   # the value that leaves
        if len(members) == 1 and role == "forward":
            n = members[0]
            d = nodes[n]
            v = vals.get(n) if vals is not None else None
            label = _label(n, d["op"], d["shape"], opts["max_label"],
                           value=fmt_value(v) if v is not None else None)
            kind = _node_kind(d)
        else:
            ops = []
            for n in groups[run[0]]:
                op = nodes[n]["op"]
                if op not in ("param", "const", "input") and op not in ops:
                    ops.append(op)
            if not ops:
                ops = sorted({nodes[n]["op"] for n in groups[run[0]]})
            n_par = sum(shapes.numel(nodes[n]["shape"]) or 0 for n in members if n in params)
            lines = [_short(nid, opts["max_label"]),
                     _short("+".join(ops), 40) + (" (each)" if len(run) > 1 else ""),
                     shapes.fmt(nodes[exit_node]["shape"])]
            if n_par:
                lines.append(f"{n_par:,} params")
            label = "\\n".join(lines)
            kind = {"forward": "forward", "backward": "backward", "update": "update"}[role]
            if all(nodes[n]["op"] in ("param", "const", "input") for n in members):
                kind = _node_kind(nodes[members[0]])
        sc.node(nid, label, kind, role, output=any(n in g.outputs for n in members))
        if role == "forward":
            fwd_by_name[base] = nid
        else:
            pending_partner.append((nid, base))
    for nid, base in pending_partner:
        if base in fwd_by_name:
            sc.partner[nid] = fwd_by_name[base]
    _collapsed_edges(g, sc, gid, member_of)
    return sc


def _collapsed_edges(g, sc, gid, member_of):
    """One edge per pair of drawn groups and kind, labelled with the gate rules it stands for."""
    nodes = g.nx.nodes
    agg = {}
    for u, v, ed in g.nx.edges(data=True):
        a, b = gid[member_of[u]], gid[member_of[v]]
        if a == b or nodes[u]["op"] == "const":
            continue
        kind = _edge_kind(sc.nodes[a]["role"], sc.nodes[b]["role"])
        if kind == "saved":        # the mirror already pairs them; the dashed web would hide the rest
            continue
        rule = ed.get("rule") or nodes[v].get("rule")
        key = (a, b, kind)
        agg.setdefault(key, [])
        if kind in ("gradient", "update") and rule and rule not in agg[key]:
            agg[key].append(rule)
    for (a, b, kind), rules in agg.items():
        sc.edges.append((a, b, kind, ", ".join(rules) or None))


# ------------------------------------------------------------------------------------------ emission

def _depth(sc):
    """Longest forward chain of the scene (decides LR for short graphs, TB for long ones)."""
    import networkx as nx
    h = nx.DiGraph()
    h.add_nodes_from(n for n, d in sc.nodes.items() if d["role"] == "forward")
    h.add_edges_from((t, hd) for t, hd, kind, _ in sc.edges if kind == "forward")
    try:
        return nx.dag_longest_path_length(h) + 1 if len(h) else 0
    except nx.NetworkXUnfeasible:
        return len(h)


def _emit(sc, title, layout, rankdir, has_backward):
    import graphviz
    dot = graphviz.Digraph(
        "graphc",
        graph_attr=dict(rankdir=rankdir, label=title, labelloc="t", fontname="Helvetica", fontsize="12",
                        nodesep="0.25", ranksep="0.35", newrank="true", compound="true"),
        node_attr=dict(fontname="Helvetica", fontsize="9", margin="0.08,0.03", height="0.3"),
        edge_attr=dict(fontname="Helvetica", fontsize="8", arrowsize="0.7"))
    reverse_gradients = has_backward and layout == "mirror"

    def sid(nid):          # the graphviz package reads "a:b" in an edge as node a, port b
        return nid.replace(":", "%3A")

    def node_attrs(nid):
        d = sc.nodes[nid]
        attrs = dict(_STYLE[d["kind"]])
        attrs["class"] = f"graphc-{d['kind']} graphc-{d['role']}"
        if d["output"]:
            attrs["peripheries"] = "2"
        if d.get("tooltip"):
            attrs["tooltip"] = d["tooltip"]
        return attrs

    def add_nodes(container, ids):
        for nid in ids:
            container.node(sid(nid), sc.nodes[nid]["label"], **node_attrs(nid))

    def add_clusters(container, cids):
        for cid in cids:
            c = sc.clusters[cid]
            color = BACKWARD_COLOR if c["role"] == "backward" else UPDATE_COLOR if c["role"] == "update" \
                else FORWARD_COLOR
            with container.subgraph(name=sid(cid)) as sub:
                sub.attr(label=f"kernel {c['label']}", style="rounded,dashed", color=color, fontcolor=color,
                         fontsize="10", penwidth="1.5")
                sub.attr("graph", **{"class": "graphc-fused"})
                add_nodes(sub, c["nodes"])

    free = [n for n, d in sc.nodes.items() if d["cluster"] is None]
    if has_backward and layout == "separate":
        for role, label in (("forward", "forward"), ("backward", "backward (gradients)"), ("update", "update")):
            ids = [n for n in free if sc.nodes[n]["role"] == role or (role == "forward" and
                                                                      sc.nodes[n]["role"] == "ghost")]
            cids = [c for c, cd in sc.clusters.items() if cd["role"] == role]
            if not ids and not cids:
                continue
            color = {"forward": FORWARD_COLOR, "backward": BACKWARD_COLOR, "update": UPDATE_COLOR}[role]
            with dot.subgraph(name=f"cluster_role_{role}") as sub:
                sub.attr(label=label, color=color, fontcolor=color, style="rounded")
                add_nodes(sub, ids)
                add_clusters(sub, cids)
    else:
        add_nodes(dot, free)
        add_clusters(dot, list(sc.clusters))

    for t, h, kind, label in sc.edges:
        attrs = dict(_EDGE[kind])
        if label:
            attrs["label"] = label
        if kind == "gradient" and reverse_gradients:
            dot.edge(sid(h), sid(t), dir="back", **attrs)      # laid out the way the forward came, drawn backward
        else:
            dot.edge(sid(t), sid(h), **attrs)
    if has_backward and layout == "mirror":
        for b, f in sc.partner.items():
            if b in sc.nodes and f in sc.nodes:
                with dot.subgraph() as s:
                    s.attr(rank="same")
                    s.node(sid(f))
                    s.node(sid(b))
                dot.edge(sid(f), sid(b), style="invis")        # forward left/above, its gradient right/below
    return dot


# ------------------------------------------------------------------------------------------ output

def _engine():
    """The layout engine available here: "pygraphviz", "dot" (the program) or None."""
    try:
        import pygraphviz  # noqa: F401
        return "pygraphviz"
    except ImportError:
        pass
    return "dot" if shutil.which("dot") else None


@contextlib.contextmanager
def _quiet_fontconfig():
    """Drops the one harmless 'Fontconfig warning' line that the fontconfig bundled in the pygraphviz
    wheel prints (to fd 2, from C) when it meets a newer system config; any other output passes on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip() and not line.startswith("Fontconfig warning"):
                    print(line, file=sys.stderr)


def _layout(source, path, fmt):
    engine = _engine()
    if engine is None:
        dot_path = os.path.splitext(path)[0] + ".dot"
        atomic_write(dot_path, lambda f: f.write(source), "DOT source", binary=False)
        raise GraphError(f"cannot lay out {os.path.basename(path)}: no Graphviz layout engine found "
                         f"(neither pygraphviz nor a `dot` program); wrote the DOT source to {dot_path}. "
                         f"To render it, {ENGINE_HINT}")
    if engine == "pygraphviz":
        import pygraphviz
        with _quiet_fontconfig():
            data = pygraphviz.AGraph(string=source).draw(None, prog="dot", format=fmt)
    else:
        import graphviz
        data = graphviz.pipe("dot", fmt, source.encode())
    atomic_write(path, lambda f: f.write(data), "rendering")


def _has_backward(g):
    return any(_role(d) != "forward" for _, d in g.nx.nodes(data=True))


def prepare(graph, backward=False, fused=None, layout="mirror"):
    """The graph that will be drawn: differentiated when backward drawing is asked for and the graph has
    no backward nodes yet; run through the numba pipeline's passes (fusion) when fused=True."""
    g = graph
    if (backward or layout == "backward-only") and not _has_backward(g):
        from graphc.passes.transforms.autodiff import grad
        g = grad(graph, keep_outputs=True)
    if fused:
        g = fuse_graph(g)
    return g


def fuse_graph(graph):
    """The graph the numba backend would lower: the numba pipeline's passes, fusion included."""
    from graphc.pipeline import Pipeline
    return Pipeline("numba")(graph)


def render(graph, path=None, format=None, backward=False, layout="mirror", fused=None, values=None,
           collapse=False, rankdir=None, max_label=28, title=None):
    """Draws `graph` with Graphviz; returns the DOT source and writes `path` when given.

    backward   True: draw gc.grad(graph) (or the graph itself if it already has backward nodes).
    layout     "mirror" (backward beside the forward, gradients ranked with their values),
               "separate" (two clusters) or "backward-only".
    fused      True: run the numba pipeline's passes (fusion) first; False: draw fused nodes as single
               boxes; None: draw the graph as given, a fused node's body as a cluster.
    values     a feed dict (or True for example feeds): run the graph on the reference backend in float64
               and write every value on its node and every gradient on its edge.
    collapse   merge each layer and runs of identical layers into single nodes (for VGG16, AlexNet).
    rankdir    "LR", "TB", ... (default: LR for short graphs, TB for long ones).
    max_label  longest name shown in a label before it is shortened.
    format     svg, png, pdf, dot or json (default: the extension of `path`)."""
    from graphc.graph import Graph
    if not isinstance(graph, Graph):
        raise GraphError(f"render() takes a graphc.Graph, got {type(graph).__name__}")
    if layout not in LAYOUTS:
        raise GraphError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if rankdir is not None and str(rankdir).upper() not in ("TB", "LR", "BT", "RL"):
        raise GraphError(f"rankdir must be TB, LR, BT or RL, got {rankdir!r}")
    fmt = None
    if path is not None:
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        fmt = (format or ext or "").lower()
        if fmt == "gv":
            fmt = "dot"
        if fmt not in FORMATS:
            what = f"unknown format {format!r}" if format else f"cannot tell the output format of {path!r}"
            raise GraphError(f"{what}; choose one of {', '.join(FORMATS)} (format=... or the file's extension)")
    elif format is not None and format.lower() not in FORMATS:
        raise GraphError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if path is not None:
        check_writable(path, "rendering")          # before the layout work, not after

    g = prepare(graph, backward, fused, layout)
    vals = None
    if values is not None and values is not False:
        feeds = example_feeds(graph) if values is True else values
        vals = compute_values(g, feeds)

    has_backward = _has_backward(g)
    opts = dict(max_label=max_label, expand_fused=fused is not False)
    sc = _collapsed_scene(g, vals, opts) if collapse else _full_scene(g, vals or {}, opts)
    if layout == "backward-only" and has_backward:
        _keep_backward_only(sc)
    if rankdir is None:
        rankdir = "LR" if _depth(sc) <= 12 else "TB"
    if title is None:
        what = {"mirror": "forward (green) and backward (red, edges labelled with gate rules)",
                "separate": "forward (green) and backward (red, edges labelled with gate rules)",
                "backward-only": "backward (red, edges labelled with gate rules)"}[layout] \
            if has_backward else "forward"
        title = f"{graph.name}: {what}" + (" - collapsed" if collapse else "") + \
            (" - with values" if vals is not None else "")
    dot = _emit(sc, title, layout, str(rankdir).upper(), has_backward)
    source = dot.source
    if path is not None:
        if fmt == "dot":
            atomic_write(path, lambda f: f.write(source), "rendering", binary=False)
        elif fmt == "json":
            data = to_json(g, vals)
            atomic_write(path, lambda f: json.dump(data, f, indent=1), "rendering", binary=False)
        else:
            _layout(source, path, fmt)
    return source


def _keep_backward_only(sc):
    """Drops the forward nodes; the forward values a gradient rule reads stay as dashed ghosts."""
    keep = {n for n, d in sc.nodes.items() if d["role"] != "forward"}
    for cid, c in list(sc.clusters.items()):
        if c["role"] == "forward":
            del sc.clusters[cid]
    ghosts = {t for t, h, kind, _ in sc.edges if kind == "saved" and h in keep and t not in keep}
    for n in list(sc.nodes):
        if n in ghosts:
            d = sc.nodes[n]
            d["label"] = d["label"].split("\\n")[0]
            d["kind"], d["role"], d["cluster"], d["output"] = "ghost", "ghost", None, False
        elif n not in keep:
            del sc.nodes[n]
    sc.edges = [e for e in sc.edges if e[0] in sc.nodes and e[1] in keep]
    sc.partner = {}


def dot_stats(source) -> dict:
    """Counts in a DOT source made by render(): nodes, visible edges, edges by colour, clusters, labels
    (for tests and for `graphc render`'s summary line)."""
    node_re = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|[\w.]+)\s*\[(?!.*->)')
    nodes, edges, colours, clusters, labels = 0, 0, defaultdict(int), 0, []
    for line in source.splitlines():
        s = line.strip()
        if re.match(r'subgraph "?cluster_', s):
            clusters += 1
        elif "->" in s:
            if "style=invis" in s:
                continue
            edges += 1
            m = re.search(r'color="?(#[0-9a-fA-F]{6}|\w+)"?', s)
            if m:
                colours[m.group(1)] += 1
            m = re.search(r'label="((?:[^"\\]|\\.)*)"', s) or re.search(r"label=([^\s\]]+)", s)
            if m:
                labels.append(m.group(1))
        elif node_re.match(s) and not s.startswith(("graph ", "node ", "edge ")):
            nodes += 1
    return dict(nodes=nodes, edges=edges, colours=dict(colours), clusters=clusters, edge_labels=labels)
