"""The collapsed view of graphc.rendering (``collapse=True``): each layer (``conv3_1``, ``conv3_1.w``,
``conv3_1.b``, ``conv3_1.relu``) one node, its backward one ``d conv3_1`` node, and runs of identical
consecutive layers one node (``conv3_[1-3] x3``), so VGG16's backward fits a page."""
from __future__ import annotations

import re
from collections import defaultdict

from graphc import shapes
from graphc.render_scene import Scene, body_of, edge_kind, make_label, node_kind, role_of, short
from graphc.render_values import fmt_value

_STEM = re.compile(r"^(.*?)(\d+)$")


def _layers(g):
    """Forward value -> its layer name; backward/update node -> the forward layer whose rule made it."""
    nodes = g.nx.nodes
    topo = g.topo()
    fwd = [n for n in topo if role_of(nodes[n]) == "forward"]
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


def _fused_layers(g, layer0):
    """Layers of a fused graph from those of the same graph unfused (layer0): a fused node joins the layer
    of its body's first value, a getitem the fused node it reads, every other node keeps its own."""
    nodes = g.nx.nodes
    layer = {}
    for n in g.topo():
        d = nodes[n]
        body = body_of(d)
        if d["op"] == "getitem" and d["inputs"] and d["inputs"][0] in layer:
            layer[n] = layer[d["inputs"][0]]
        elif body is not None:
            names = [b.get("name") for b in body if b.get("name") in layer0]
            layer[n] = layer0[names[0]] if names else n
        elif n in layer0:
            layer[n] = layer0[n]
        else:
            layer[n] = next((layer[i] for i in d["inputs"] if i in layer), n)
    return layer


#: ops a collapsed node does not list: they move or pick values, they compute nothing
_QUIET_OPS = ("param", "const", "input", "getitem", "identity", "copy")


def _group_ops(nodes, members):
    """The ops a collapsed node lists (a fused kernel's body ops, marked as fused)."""
    ops = []
    for n in members:
        d = nodes[n]
        body = body_of(d)
        for op in ([b.get("op", "?") for b in body] if body else [d["op"]]):
            if op not in _QUIET_OPS and op not in ops:
                ops.append(op)
    fused = any(body_of(nodes[n]) for n in members)
    return ops or sorted({nodes[n]["op"] for n in members}), fused


def _shown_shape(nodes, members, exit_node, role, base):
    """The shape a collapsed node shows: the value that leaves a forward layer; for a backward layer the
    gradient of the layer's output (not a bias's gradient), else its largest value."""
    if role != "backward":
        return nodes[exit_node]["shape"]
    for n in members:
        if nodes[n].get("grad_of") == base:
            return nodes[n]["shape"]
    sized = [n for n in members if nodes[n]["op"] not in ("param", "const")]
    return nodes[max(sized, key=lambda n: _numel(nodes[n]["shape"]))]["shape"] if sized else nodes[exit_node]["shape"]


def _numel(shape):
    out = 1
    for d in shape:
        out *= d if isinstance(d, int) else 1024          # a batch dimension counts as large
    return out


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


def collapsed_scene(g, vals, opts, unfused=None):
    """Each layer one node, runs of identical layers one node (conv3_[1-3] x3), backward layers 'd <layer>'.
    unfused: for a fused graph, the same graph before fusion (its layers name the fused kernels')."""
    nodes = g.nx.nodes
    topo = g.topo()
    pos = {n: i for i, n in enumerate(topo)}
    layer = _layers(g) if unfused is None else _fused_layers(g, _layers(unfused))
    groups = defaultdict(list)                      # (role, layer) -> members in topo order
    member_of = {}
    for n in topo:                  # a constant joins its first user's group (a shared 0 is no layer)
        role = role_of(nodes[n])
        if nodes[n]["op"] == "const":
            users = sorted(g.nx.successors(n), key=pos.get)
            if users:
                role = role_of(nodes[users[0]])
        member_of[n] = (role, layer[n])
        groups[member_of[n]].append(n)
    gedges = set()
    for u, v in g.nx.edges():
        a, b = member_of[u], member_of[v]
        if a != b:
            gedges.add((a, b))
            gedges.add((b, a))

    runs = _layer_runs(nodes, groups, gedges, pos)
    sc = Scene()
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
            label = make_label(dict(name=n, op=d["op"], shape=d["shape"], max_label=opts["max_label"],
                                    value=fmt_value(v) if v is not None else None))
            kind = node_kind(d)
        else:
            ops, fused = _group_ops(nodes, groups[run[0]])
            n_par = sum(shapes.numel(nodes[n]["shape"]) or 0 for n in members if n in params)
            shown = _shown_shape(nodes, groups[run[-1]], exit_node, role, run[-1][1])
            lines = [short(nid, opts["max_label"]),
                     short("+".join(ops), 40) + (" (fused)" if fused else "") + (" (each)" if len(run) > 1 else ""),
                     shapes.fmt(shown)]
            if n_par:
                lines.append(f"{n_par:,} params")
            label = "\\n".join(lines)
            kind = {"forward": "forward", "backward": "backward", "update": "update"}[role]
            if all(nodes[n]["op"] in ("param", "const", "input") for n in members):
                kind = node_kind(nodes[members[0]])
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
        kind = edge_kind(sc.nodes[a]["role"], sc.nodes[b]["role"])
        if kind == "saved":        # the mirror already pairs them; the dashed web would hide the rest
            continue
        fused = body_of(nodes[v]) is not None      # into a fused kernel: the rule that made the value it reads
        rule = ed.get("rule") or (nodes[u].get("rule") if fused else nodes[v].get("rule"))
        key = (a, b, kind)
        agg.setdefault(key, [])
        if kind in ("gradient", "update") and rule and rule != "grad" and rule not in agg[key]:
            agg[key].append(rule)
    for (a, b, kind), rules in agg.items():
        sc.edge(a, b, kind, ", ".join(rules) or None)
