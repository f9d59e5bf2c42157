"""Fusion: groups of nodes become one ``fused`` node (graphc.ops.fused) that a backend runs as one kernel.

*What* is grouped is declared in passes/patterns.py, each pattern once (conv_relu_maxpool with its
saved route and its route_relu backward, conv_relu, conv_clip, dropout, pad_maxpool, elementwise); this file is the one matcher that
applies every declaration:

- the patterns' ``prepare`` rewrites run first (each once);
- chain patterns: for each node in topological order that can start a chain, the patterns are tried
  in their declared order and the first that matches becomes a group. A chain member is the single
  reader of the previous member with the role's op; interior members must be read only inside the
  group -- or by a backward chain the pattern declares, which then becomes its own fused node reading
  the value the forward group saves (``saves``) instead;
- region patterns: connected groups of member nodes, grown along edges where ``join`` holds and never
  through a path that leaves the group and comes back (that would make a cycle).

A group with several results evaluates to a tuple read through ``getitem`` nodes that keep the original
names (see graphc.ops.fused); a group never swallows a protected value (outputs, updates, the loss,
compile(keep=...)) except as one of its named results. Every body node carries its role name.
"""
import itertools

from graphc.passes import patterns as declared
from graphc.passes.dce import dce
from graphc.passes.helpers.rewrite import consumers, data, is_const_fill, protected
from graphc.passes.patterns import Any, Chain, Const, Op, Ref, Region


# --- building fused nodes -----------------------------------------------------------------------------

def make_group(g, pattern, members, roles, body_ops=None, results=None, name=None, extra_attrs=None, drop=()):
    """Replaces the nodes `members` (names, in topological order) by one fused node.

    roles: {body node name: its role in the pattern} (every body node has one; lowerings read by role).
    body_ops: optional {member: (op, attrs, inputs, shape, dtype)} overrides, for bodies that use other
    ops than the nodes they replace, and extra body nodes (names not in the graph) to append.
    results: member names whose values leave the group (default: members read outside, or protected).
    drop: members that are removed but have no body node (their work is subsumed by another body node).
    Returns the fused node's name."""
    prot = protected(g)
    body_ops = body_ops or {}
    body_names = [m for m in members if m not in drop] + [k for k in body_ops if k not in members]
    mset = set(members)
    spec = {}
    for m in body_names:
        if m in body_ops:
            spec[m] = body_ops[m]
        else:
            d = data(g, m)
            spec[m] = (d["op"], dict(d["attrs"]), tuple(d["inputs"]), tuple(d["shape"]), d["dtype"])
    if results is None:
        results = [m for m in members if m in prot or any(u not in mset for u in g.nx.successors(m))]
    outer, index = [], {m: j for j, m in enumerate(body_names)}
    body = []
    for m in body_names:
        op, attrs, ins, shape, dtype = spec[m]
        refs = []
        for i in ins:
            if i in index and index[i] < index[m]:
                refs.append(("body", index[i]))
            else:
                if i not in outer:
                    outer.append(i)
                refs.append(("in", outer.index(i)))
        body.append({"name": m, "op": op, "role": roles[m], "inputs": tuple(refs), "attrs": attrs, "shape": shape,
                     "dtype": dtype})
    res_idx = tuple(index[r] for r in results)
    in_types = tuple((tuple(data(g, i)["shape"]), data(g, i)["dtype"]) for i in outer)
    attrs = {"pattern": pattern, "body": tuple(body), "results": res_idx, "in_types": in_types,
             "replaces": tuple(members)}
    attrs.update(extra_attrs or {})
    last = data(g, members[-1]) if members[-1] in g.nx else data(g, results[0])
    role, rule = last["role"], last.get("rule")
    order = max(data(g, m)["order"] for m in members if m in g.nx)
    # remember who reads each result outside the group (and the edge attributes)
    readers = {r: [(u, dict(g.nx.edges[r, u])) for u in consumers(g, r) if u not in mset]
               for r in results if r in g.nx}
    g.nx.remove_nodes_from([m for m in members if m in g.nx])
    first = body[res_idx[0]]
    if len(results) == 1:
        fname = results[0]
    else:
        fname = name or _fresh(g, f"{pattern}:{results[0]}")
    g.nx.add_node(fname, op="fused", inputs=tuple(outer), attrs=attrs, shape=tuple(first["shape"]),
                  dtype=first["dtype"], role=role, rule=rule, order=order)
    for i in outer:
        g.nx.add_edge(i, fname, rule=None)
    if len(results) == 1:
        for u, ea in readers.get(fname, []):
            g.nx.add_edge(fname, u, **ea)
        return fname
    for k, r in enumerate(results):
        b = body[res_idx[k]]
        g.nx.add_node(r, op="getitem", inputs=(fname,), attrs={"index": k}, shape=tuple(b["shape"]),
                      dtype=b["dtype"], role=role, rule=rule, order=order + 1e-3 * (k + 1))
        g.nx.add_edge(fname, r, rule=None)
        for u, ea in readers.get(r, []):
            g.nx.add_edge(r, u, **ea)
    return fname


def _fresh(g, base):
    if base not in g.nx:
        return base
    for k in itertools.count(2):
        if f"{base}#{k}" not in g.nx:
            return f"{base}#{k}"


# --- matching -----------------------------------------------------------------------------------------

class Match:
    """One match of a pattern: role -> node name."""

    def __init__(self, nodes=None):
        self.nodes = dict(nodes or {})

    def __getitem__(self, role):
        return self.nodes[role]

    def attrs(self, g, role):
        return data(g, self.nodes[role])["attrs"]

    def shape(self, g, role):
        return tuple(data(g, self.nodes[role])["shape"])


def _match_tree(g, pat, n, m):
    """Matches the tree pattern `pat` (Op / Ref / Any / Const) at node n, binding roles into m (left
    unchanged on failure). Returns True on a match."""
    if isinstance(pat, Ref):
        return m.nodes.get(pat.role) == n
    if isinstance(pat, Any):
        if pat.role in m.nodes:
            return m.nodes[pat.role] == n
        m.nodes[pat.role] = n
        return True
    if isinstance(pat, Const):
        return is_const_fill(g, n, pat.value)
    d = data(g, n)
    if d["op"] != pat.op or m.nodes.get(pat.role, n) != n or len(d["inputs"]) != len(pat.inputs):
        return False
    orders = itertools.permutations(range(len(pat.inputs))) if pat.unordered else [range(len(pat.inputs))]
    for order in orders:
        trial = Match(m.nodes)
        trial.nodes[pat.role] = n
        if all(_match_tree(g, pat.inputs[k], d["inputs"][j], trial) for k, j in enumerate(order)) \
                and (pat.guard is None or pat.guard(g, trial)):
            m.nodes = trial.nodes
            return True
    return False


def _tree_roles(pat):
    """The roles an Op tree binds to nodes it owns (not Refs, Anys or Consts)."""
    if not isinstance(pat, Op):
        return []
    return [pat.role] + [r for p in pat.inputs for r in _tree_roles(p)]


def _match_backward(g, bw, m, outside, prot):
    """The backward chain of `bw` through the forward match m, covering every outside reader of m's
    interior members; its interior nodes are read only inside it. Returns a Match (forward roles too)."""
    candidates = list(dict.fromkeys(r for u in outside for r in [u] + consumers(g, u)))
    for root in candidates:
        bm = Match(m.nodes)
        if not _match_tree(g, bw.root, root, bm):
            continue
        owned = [bm[r] for r in _tree_roles(bw.root)]
        inner = [n for n in owned if n != root]
        if not set(outside) <= set(owned) or any(n in prot for n in inner):
            continue
        if any(u not in owned for n in inner for u in consumers(g, n)):
            continue
        if bw.extra is not None:
            for u in consumers(g, root):
                trial = Match(bm.nodes)
                if _match_tree(g, bw.extra, u, trial):
                    bm = trial
                    break
        return bm
    return None


def _match_chain(g, p, anchor, prot):
    """(forward Match, backward Match or None) of chain pattern p starting at `anchor`, or None."""
    m, cur = Match(), anchor
    for k, role in enumerate(p.roles):
        if k:
            cands = [u for u in consumers(g, cur)
                     if data(g, u)["op"] == role.op and (role.guard is None or role.guard(g, u))]
            if len(cands) != 1:
                return None
            cur = cands[0]
        elif role.guard is not None and not role.guard(g, cur):
            return None
        m.nodes[role.name] = cur
    members = [m[r.name] for r in p.roles]
    interior = members[:-1]
    if any(n in prot for n in interior):
        return None
    outside = [u for n in interior for u in consumers(g, n) if u not in members]
    back = None
    if outside:
        back = _match_backward(g, p.backward, m, outside, prot) if p.backward is not None else None
        if back is None:
            return None
    if p.guard is not None and not p.guard(g, m):
        return None
    return m, back


# --- applying a match ----------------------------------------------------------------------------------

def _backward_body(g, bw, bm):
    """(members, body_ops, roles, results, drop) of the backward group; read while the forward members
    still exist (the body's attrs may read them)."""
    members = sorted((bm[r] for r in _tree_roles(bw.root) + _tree_roles(bw.extra) if r in bm.nodes),
                     key=lambda n: data(g, n)["order"])
    name_of, body, roles = dict(bm.nodes), {}, {}
    for b in bw.body:
        if b.replaces not in bm.nodes:
            continue                    # an optional node that is not there (no conv bias)
        target = bm[b.replaces]
        name_of[b.role] = target
        d = data(g, target)
        body[target] = (b.op, b.attrs(g, bm), tuple(name_of[r] for r in b.inputs), tuple(d["shape"]), d["dtype"])
        roles[target] = b.role
    return members, body, roles, list(body), [n for n in members if n not in body]


def _apply_chain(g, p, m, back):
    members = [m[r.name] for r in p.roles]
    roles = {m[r.name]: r.name for r in p.roles}
    if back is None:
        make_group(g, p.name, members, roles, results=[members[-1]])
        return
    s = p.saves
    like = data(g, m[s.like])
    saved = _fresh(g, f"{m[s.like]}.{s.role}")
    extra = {saved: (s.op, s.attrs(g, m), (m[s.input],), tuple(like["shape"]), s.dtype)}
    roles[saved] = s.role
    back.nodes[s.role] = saved
    bw_members, bw_body, bw_roles, bw_results, bw_drop = _backward_body(g, p.backward, back)
    make_group(g, p.name, members, roles, body_ops=extra, results=[members[-1], saved],
               extra_attrs={"saves": (s.role,)})
    make_group(g, p.backward.pattern, bw_members, bw_roles, body_ops=bw_body, results=bw_results, drop=bw_drop)


def fuse_chains(g, chains):
    prot = protected(g)
    starts = {p.roles[0].op for p in chains}
    for anchor in [n for n in g.topo() if data(g, n)["op"] in starts]:
        for p in chains:
            if anchor not in g.nx:
                break
            if data(g, anchor)["op"] != p.roles[0].op:
                continue
            found = _match_chain(g, p, anchor, prot)
            if found is not None:
                _apply_chain(g, p, *found)
                break


# --- regions -------------------------------------------------------------------------------------------

def _convex(g, group, pos):
    """No path leaves `group` and comes back into it (fusing it would make a cycle)."""
    hi = max(pos[m] for m in group)
    frontier = [u for m in group for u in g.nx.successors(m) if u not in group and pos[u] < hi]
    seen = set()
    while frontier:
        u = frontier.pop()
        if u in seen:
            continue
        seen.add(u)
        for v in g.nx.successors(u):
            if v in group:
                return False
            if v not in seen and pos[v] < hi:
                frontier.append(v)
    return True


def fuse_region(g, p):
    """Groups connected `p.member` nodes (joined where p.join holds) into fused nodes of pattern p."""
    order = g.topo()
    pos = {n: i for i, n in enumerate(order)}
    group_of = {}
    groups = {}
    for n in order:
        if not p.member(g, n):
            continue
        group_of[n] = n
        groups[n] = {n}
        for i in data(g, n)["inputs"]:
            if i not in group_of or group_of[i] == group_of[n] or not p.join(g, i, n):
                continue
            a, b = group_of[i], group_of[n]
            merged = groups[a] | groups[b]
            if not _convex(g, merged, pos):
                continue
            groups[a] = merged
            for m in groups[b]:
                group_of[m] = a
            del groups[b]
    for members in groups.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=pos.get)
        make_group(g, p.name, members, {m: f"{p.role}{k}" for k, m in enumerate(members)})


def fuse(graph, patterns=None):
    """The graph with every match of `patterns` (default: passes.patterns.PATTERNS, in that order) fused."""
    patterns = declared.PATTERNS if patterns is None else list(patterns)
    g = graph.clone()
    prepared = []
    for p in patterns:
        if getattr(p, "prepare", None) is not None and p.prepare not in prepared:
            prepared.append(p.prepare)
            p.prepare(g)
    chains = [p for p in patterns if isinstance(p, Chain)]
    if chains:
        fuse_chains(g, chains)
    for p in patterns:
        if isinstance(p, Region):
            fuse_region(g, p)
    return dce(g)      # nodes the rewrites orphaned (a gt mask whose relu took over) go away
