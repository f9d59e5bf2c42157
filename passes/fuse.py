"""Fusion: groups of nodes become one ``fused`` node (graphc.ops.fused) that a backend runs as one kernel.

Patterns, tried in this order:

``conv_relu_maxpool``  conv(+bias) -> relu -> maxpool, when the conv and ReLU outputs are read by nothing
    else. In a training graph the ReLU output and the conv output are also read by the backward pass
    (maxpool_route reads the ReLU output, the ReLU mask gt(., 0) reads the conv output). When those
    readers are exactly the pool-route -> mask -> mul chain that autodiff builds, the forward group
    also *saves its route* (a second, int32 result: the flat index of each window's max, -1 where the
    ReLU zeroed the window) and the chain becomes

``route_relu``  (backward) route_scatter(dy, route) — the max-pool route and the ReLU mask in one pass
    over the pooled gradient — plus, when the conv has a bias, its gradient sum(dz, (0, 2, 3)) as a
    second result computed in the same pass. conv_dx and conv_dw then read dz. The backward needs no
    full-resolution forward value at all.

``conv_relu``  conv(+bias) -> relu (no pool, or a pool that cannot join).

``elementwise``  any connected group of elementwise nodes of one output shape (inputs of other shapes
    broadcast in: biases, scalars, the learning rate), e.g. bias + ReLU after a matmul, the backward
    ReLU mask, and a whole optimizer update (momentum's new velocity and new weight are two results).

Before matching, the ReLU masks of the backward pass are rewritten from gt(x, 0) to gt(relu(x), 0)
(equal values: relu(x) > 0 exactly when x > 0), so a conv output is read only by its ReLU.

A group with several results evaluates to a tuple read through ``getitem`` nodes that keep the original
names (see graphc.ops.fused); a group never swallows a protected value (outputs, updates, the loss,
compile(keep=...)) except as one of its named results.
"""
import itertools

from graphc import ops as optable
from graphc.passes.rewrite import consumers, data, is_const_fill, protected, set_inputs

FUSABLE_POOL_ATTRS = ("size", "stride")


# --- building fused nodes -----------------------------------------------------------------------------

def make_group(g, pattern, members, body_ops=None, results=None, name=None, extra_attrs=None, drop=(), roles=None):
    """Replaces the nodes `members` (names, in topological order) by one fused node.

    body_ops: optional {member: (op, attrs, inputs, shape, dtype)} overrides, for bodies that use other
    ops than the nodes they replace, and extra body nodes (names not in the graph) to append.
    results: member names whose values leave the group (default: members read outside, or protected).
    drop: members that are removed but have no body node (their work is subsumed by another body node).
    roles: {body node name: role} (lowerings read members by role); default "ew<k>" for body node k.
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
        body.append({"name": m, "op": op, "inputs": tuple(refs), "attrs": attrs, "shape": shape, "dtype": dtype,
                     "role": (roles or {}).get(m, f"ew{len(body)}")})
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


# --- the ReLU mask rewrite ---------------------------------------------------------------------------

def relu_masks_on_outputs(g):
    """gt(x, 0) -> gt(relu(x), 0) wherever relu(x) exists (equal values)."""
    for n in list(g.nx.nodes):
        d = data(g, n)
        if d["op"] != "gt":
            continue
        x, z = d["inputs"]
        if not is_const_fill(g, z, 0.0) or data(g, x)["op"] == "relu":
            continue
        relus = [u for u in consumers(g, x) if data(g, u)["op"] == "relu"]
        if relus and tuple(data(g, relus[0])["shape"]) == tuple(d["shape"]):
            set_inputs(g, n, (relus[0], z))


# --- conv patterns ---------------------------------------------------------------------------------

def _match_pool_backward(g, r, p, others, prot):
    """The autodiff chain through relu r and pool p: R = maxpool_route(r, dy), G = gt(r, 0),
    M = mul(R, G). Returns (R, G, M, S or None) with S = sum(M, (0, 2, 3)) (the bias gradient)."""
    routes = [u for u in others if data(g, u)["op"] == "maxpool_route"]
    gts = [u for u in others if data(g, u)["op"] == "gt"]
    if len(routes) != 1 or len(gts) != 1 or len(others) != 2:
        return None
    R, G = routes[0], gts[0]
    dR, dG, dp = data(g, R), data(g, G), data(g, p)
    if dR["inputs"][0] != r or any(dR["attrs"][k] != dp["attrs"][k] for k in FUSABLE_POOL_ATTRS):
        return None
    if dG["inputs"][0] != r or not is_const_fill(g, dG["inputs"][1], 0.0):
        return None
    if R in prot or G in prot:
        return None
    cR, cG = consumers(g, R), consumers(g, G)
    if len(cR) != 1 or cR != cG or data(g, cR[0])["op"] != "mul" or set(data(g, cR[0])["inputs"]) != {R, G}:
        return None
    M = cR[0]
    S = None
    for u in consumers(g, M):
        du = data(g, u)
        if du["op"] == "sum" and tuple(du["attrs"]["axes"]) == (0, 2, 3) and not du["attrs"]["keepdims"]:
            S = u
            break
    return R, G, M, S


def fuse_convs(g):
    prot = protected(g)
    for c in [n for n in g.topo() if data(g, n)["op"] == "conv"]:
        if c not in g.nx or c in prot:
            continue
        cc = consumers(g, c)
        if len(cc) != 1 or data(g, cc[0])["op"] != "relu":
            continue
        r = cc[0]
        rc = consumers(g, r)
        pools = [u for u in rc if data(g, u)["op"] == "maxpool"]
        if r not in prot and len(pools) == 1:
            p = pools[0]
            others = [u for u in rc if u != p]
            chain = _match_pool_backward(g, r, p, others, prot) if others else None
            if not others or chain is not None:
                _fuse_conv_pool(g, c, r, p, chain)
                continue
        make_group(g, "conv_relu", [c, r], results=[r], roles={c: "conv", r: "act"})


def _fuse_conv_pool(g, c, r, p, chain):
    dp = data(g, p)
    pool_attrs = {k: dp["attrs"][k] for k in FUSABLE_POOL_ATTRS}
    if chain is None:
        make_group(g, "conv_relu_maxpool", [c, r, p], results=[p], roles={c: "conv", r: "act", p: "pool"})
        return
    R, G, M, S = chain
    conv_hw = tuple(data(g, c)["shape"][2:])
    route = _fresh(g, f"{p}.route")
    extra = {route: ("maxpool_argmax", dict(pool_attrs, relu=True), (r,), tuple(dp["shape"]), "int32")}
    make_group(g, "conv_relu_maxpool", [c, r, p], body_ops=extra, results=[p, route],
               extra_attrs={"saves": ("route",)}, roles={c: "conv", r: "act", p: "pool", route: "route"})
    # the backward chain: dz = route_scatter(dy, route) (+ db = sum(dz)) in one node
    dy = data(g, R)["inputs"][1]
    dM = data(g, M)
    body = {M: ("route_scatter", dict(pool_attrs, in_hw=conv_hw), (dy, route), tuple(dM["shape"]), dM["dtype"])}
    members = [R, G, M]
    results = [M]
    if S is not None:
        dS = data(g, S)
        body[S] = ("sum", dict(dS["attrs"]), (M,), tuple(dS["shape"]), dS["dtype"])
        members.append(S)
        results.append(S)
    make_group(g, "route_relu", members, body_ops=body, results=results, drop=(R, G),
               roles={M: "scatter", S: "bias_grad"})


# --- elementwise groups -------------------------------------------------------------------------------

def _elementwise(g, n):
    d = data(g, n)
    return d["op"] != "fused" and optable.OPS[d["op"]].scalar is not None


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


def fuse_elementwise(g):
    order = g.topo()
    pos = {n: i for i, n in enumerate(order)}
    group_of = {}
    groups = {}
    for n in order:
        if not _elementwise(g, n):
            continue
        group_of[n] = n
        groups[n] = {n}
        d = data(g, n)
        for i in d["inputs"]:
            if i not in group_of or group_of[i] == group_of[n]:
                continue
            di = data(g, i)
            if tuple(di["shape"]) != tuple(d["shape"]) or di["dtype"] != d["dtype"]:
                continue
            if (di["role"] == "forward") != (d["role"] == "forward"):
                continue       # a forward group that also computed a backward value would keep it alive
            a, b = group_of[i], group_of[n]
            merged = groups[a] | groups[b]
            if not _convex(g, merged, pos):
                continue
            groups[a] = merged
            for m in groups[b]:
                group_of[m] = a
            del groups[b]
    for key, members in groups.items():
        if len(members) < 2:
            continue
        make_group(g, "elementwise", sorted(members, key=pos.get))


def fuse(graph, patterns=("conv", "elementwise")):
    g = graph.clone()
    if "conv" in patterns:
        relu_masks_on_outputs(g)
        fuse_convs(g)
    if "elementwise" in patterns:
        fuse_elementwise(g)
    # nodes the rewrites orphaned (a gt mask whose relu took over) go away
    from graphc.passes.dce import dce
    return dce(g)
