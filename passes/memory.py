"""Memory plan: liveness over the schedule, and buffer slots shared by values whose lifetimes do not overlap.

`plan_memory(graph)` stores a `MemoryPlan` on the graph (``graph.memory_plan``) for the values a run
must deliver (the outputs, and in a training graph the loss and every update). Backends that preallocate
(the numba backend) bind each value to a view of its slot's buffer, allocated once per batch size.

Kinds of value:
    input / param / const   live outside the plan (the feed buffer, the executable's state, the constant)
    alias                   ops marked alias in the op table (reshape, reshape_like, identity, copy) are
                            views of their input's buffer
                            (the input's buffer then lives as long as any of its aliases is read)
    tuple                   a fused node with several results: no buffer, its getitem nodes own them
    state                   an optimizer update written in place into the state it replaces: legal when
                            the update's kernel is elementwise, reads that state index-aligned, and is
                            the last reader of it (so forward, backward and update run in one pass and
                            nothing is copied back afterwards)
    buffer                  everything else: slot k (plan.slot_of[name])

A value's buffer is freed after its last reader has run; a node's outputs never share a slot with its
own inputs. Slots are assigned two ways (greedily in program order, and largest value first into the
first slot free for its whole lifetime) and the plan keeps the smaller total. Slot sizes depend on the batch size, so the plan keeps shapes symbolic and
`slot_nbytes(env, itemsize)` gives the sizes for one binding.
"""
from __future__ import annotations

import bisect

import networkx as nx

from graphc import ops as optable
from graphc import shapes

REP_BATCH = 64        # slot matching compares sizes at this batch size


def _itemsize(dtype, float_itemsize):
    if dtype.startswith("float"):
        return float_itemsize
    return {"int64": 8, "int32": 4}.get(dtype, 8)


class MemoryPlan:
    def __init__(self, graph, program, want, kind, root, slot_of, inplace, def_idx, last_use):
        self.program = program          # node names to run, in schedule order (sources excluded)
        self.want = tuple(want)
        self.kind = kind                # name -> kind (see the module doc)
        self.root = root                # name -> name of the value owning its memory
        self.slot_of = slot_of          # name -> slot index, for kind "buffer"
        self.inplace = inplace          # update value -> state it is written into
        self.def_idx, self.last_use = def_idx, last_use
        self.nslots = 1 + max(slot_of.values(), default=-1)
        self._types = {n: (tuple(graph.nx.nodes[n]["shape"]), graph.nx.nodes[n]["dtype"]) for n in slot_of}

    def nbytes(self, name, env, float_itemsize=4):
        shape, dtype = self._types[name]
        return (shapes.numel(shape, env) or 1) * _itemsize(dtype, float_itemsize)

    def slot_nbytes(self, env, float_itemsize=4):
        sizes = [0] * self.nslots
        for n, k in self.slot_of.items():
            sizes[k] = max(sizes[k], self.nbytes(n, env, float_itemsize))
        return sizes

    def stats(self, env, float_itemsize=4):
        """{"planned": bytes of all slots, "unplanned": bytes if every value had its own buffer}."""
        return {"planned": sum(self.slot_nbytes(env, float_itemsize)),
                "unplanned": sum(self.nbytes(n, env, float_itemsize) for n in self.slot_of),
                "slots": self.nslots, "values": len(self.slot_of), "inplace_updates": len(self.inplace)}

    def __repr__(self):
        return (f"<MemoryPlan {len(self.program)} nodes, {len(self.slot_of)} buffered values in "
                f"{self.nslots} slots, {len(self.inplace)} in-place updates>")


def _elementwise_kernel(nd):
    """One elementwise loop: an elementwise op, or a fused group of them."""
    if nd["op"] == "fused":
        return all(optable.OPS[b["op"]].scalar is not None for b in nd["attrs"]["body"])
    return optable.OPS[nd["op"]].scalar is not None


def build_plan(graph, want, inplace_updates=False, schedule=None):
    """The memory plan of the nodes `want` depends on. inplace_updates: write optimizer updates into
    their states where legal (only for a training step, whose caller stores no other copy of them)."""
    nodes = graph.nx.nodes
    sched = schedule or getattr(graph, "schedule", None) or graph.topo()
    need = set(want)
    for w in want:
        need |= nx.ancestors(graph.nx, w)
    order = [n for n in sched if n in need]
    program = [n for n in order if not optable.OPS[nodes[n]["op"]].source]
    idx = {n: i for i, n in enumerate(program)}
    kind, root = {}, {}
    for n in order:
        op = nodes[n]["op"]
        if optable.OPS[op].source:
            kind[n], root[n] = op, n
        elif optable.OPS[op].alias:
            kind[n], root[n] = "alias", root[nodes[n]["inputs"][0]]
        elif op == "fused" and len(nodes[n]["attrs"]["results"]) > 1:
            kind[n], root[n] = "tuple", n
        else:
            kind[n], root[n] = "buffer", n
    def_idx = {}
    for n in program:
        if nodes[n]["op"] == "getitem":
            def_idx[n] = idx[nodes[n]["inputs"][0]]       # written by its fused node
        else:
            def_idx[n] = idx[n]
    end = len(program)
    last_use = {}
    for n in program:
        for i in nodes[n]["inputs"]:
            if kind.get(i) == "tuple":
                continue                                   # a getitem's read of its tuple is no real read
            r = root[i]
            last_use[r] = max(last_use.get(r, -1), idx[n])
    for w in want:
        last_use[root[w]] = end

    inplace = _inplace_updates(graph, program, idx, kind, root, want) if inplace_updates else {}
    slot_of = _assign(nodes, program, kind, def_idx, last_use)
    return MemoryPlan(graph, program, want, kind, root, slot_of, inplace, def_idx, last_use)


def _inplace_updates(graph, program, idx, kind, root, want):
    """{update value: state} for the optimizer updates written in place (their kind becomes "state")."""
    nodes = graph.nx.nodes
    inplace = {}
    readers = {}
    for n in program:
        for i in nodes[n]["inputs"]:
            if kind.get(i) != "tuple":
                readers.setdefault(root[i], set()).add(n)
    for s, u in graph.updates.items():
        if u not in kind or kind[u] != "buffer" or s not in kind or kind[s] != "param" or s in want:
            continue
        k = nodes[u]["inputs"][0] if nodes[u]["op"] == "getitem" else u
        kd = nodes[k]
        if not _elementwise_kernel(kd) or s not in kd["inputs"]:
            continue
        if tuple(nodes[s]["shape"]) != tuple(nodes[u]["shape"]):
            continue
        if any(idx[r] >= idx[k] and r != k for r in readers.get(s, ())):
            continue
        if any(root[i] == s and i != s for i in kd["inputs"]):
            continue                                   # read through an alias: not index-aligned
        inplace[u] = s
        kind[u] = "state"
        root[u] = s
    return inplace


def _rep_size(node):
    """Bytes of a value at the representative batch size (REP_BATCH for every symbolic dimension)."""
    shape = tuple(node["shape"])
    return (shapes.numel(shape, {d: REP_BATCH for d in shape if isinstance(d, str)}) or 1) * _itemsize(node["dtype"], 4)


def _assign(nodes, program, kind, def_idx, last_use):
    """{buffer value: slot}: of the two assignments below, the one with the smaller total (at REP_BATCH).
    Greedy in program order lets a small value take a large free slot, so that a large value defined
    later needs a new one: ResNet-18's training step planned 541 MB at batch 16 where at most 404 MB are
    live at once; largest first took 420 MB."""
    ways = [_assign_slots(nodes, program, kind, def_idx, last_use),
            _assign_by_size(nodes, program, kind, def_idx, last_use)]

    def total(slot_of):
        sizes = {}
        for n, k in slot_of.items():
            sizes[k] = max(sizes.get(k, 0), _rep_size(nodes[n]))
        return sum(sizes.values())
    return min(ways, key=total)


def _assign_by_size(nodes, program, kind, def_idx, last_use):
    """{buffer value: slot}: the largest values first, each into the first slot that holds no value live
    at the same time (a value is live from its definition to its last read, both included)."""
    end = len(program)
    vals = [n for n in program if kind[n] == "buffer"]
    vals.sort(key=lambda n: (-_rep_size(nodes[n]), def_idx[n]))
    starts, ends, slot_of = [], [], {}          # per slot: its values' intervals, sorted (disjoint)
    for n in vals:
        a = def_idx[n]
        b = last_use.get(n, a)                  # never read: free right after it is written
        b = end if b >= end else b
        for k in range(len(starts)):
            i = bisect.bisect_right(starts[k], b) - 1      # the last interval starting at or before b
            if i < 0 or ends[k][i] < a:
                break
        else:
            k = len(starts)
            starts.append([])
            ends.append([])
        i = bisect.bisect_right(starts[k], a)
        starts[k].insert(i, a)
        ends[k].insert(i, b)
        slot_of[n] = k
    return slot_of


def _assign_slots(nodes, program, kind, def_idx, last_use):
    """{buffer value: slot}: greedy over the program, a slot freed after its value's last read."""
    end = len(program)
    slot_of, slot_sig, slot_rep = {}, [], []
    free = []
    by_def = {}
    for n in program:
        if kind[n] == "buffer":
            by_def.setdefault(def_idx[n], []).append(n)
    release = {}
    for n in program:
        if kind[n] == "buffer":
            lu = last_use.get(n, def_idx[n])      # never read: free right after it is written
            if lu < end:
                release.setdefault(lu, []).append(n)
    rep_env = {}
    for n in program:
        for d in nodes[n]["shape"]:
            if isinstance(d, str):
                rep_env[d] = REP_BATCH
    for i in range(len(program)):
        for r in release.get(i - 1, []):
            if r in slot_of:
                free.append(slot_of[r])
        for n in by_def.get(i, []):
            shape, dtype = tuple(nodes[n]["shape"]), nodes[n]["dtype"]
            sig = (tuple(sorted(d for d in shape if isinstance(d, str))),
                   shapes.numel([d for d in shape if isinstance(d, int)]), _itemsize(dtype, 4))
            size = (shapes.numel(shape, rep_env) or 1) * _itemsize(dtype, 4)
            pick = None
            same = [k for k in free if slot_sig[k] == sig]
            if same:
                pick = same[0]
            else:
                bigger = sorted((slot_rep[k], k) for k in free if slot_rep[k] >= size)
                if bigger:
                    pick = bigger[0][1]
                elif free:
                    pick = max((slot_rep[k], k) for k in free)[1]
            if pick is None:
                pick = len(slot_sig)
                slot_sig.append(sig)
                slot_rep.append(size)
            else:
                free.remove(pick)
                slot_rep[pick] = max(slot_rep[pick], size)
            slot_of[n] = pick
    return slot_of


def default_want(graph):
    want = list(graph.outputs)
    if graph.updates:
        want = ([graph.loss] if graph.loss else []) + [o for o in graph.outputs if o != graph.loss]
        want += [u for u in graph.updates.values() if u not in want]
    want += [k for k in sorted(getattr(graph, "keep", ()) or ()) if k in graph.nx and k not in want]
    return want


def plan_memory(graph):
    """Stores the memory plan of a run (inference graph) or a training step (training graph)."""
    graph.memory_plan = build_plan(graph, default_want(graph), inplace_updates=bool(graph.updates))
    return graph


def plan_for(graph, want, inplace, schedule):
    """The memory plan for one binding: the graph's own plan (made by the pass) when it was made for
    these wanted values and in-place mode, else a new one over the same schedule."""
    mp = getattr(graph, "memory_plan", None)
    if mp is not None and tuple(mp.want) == tuple(want) and bool(mp.inplace) == bool(inplace) \
            and list(mp.program) == [n for n in schedule if n in set(mp.program)]:
        return mp
    if mp is not None and tuple(want) == tuple(default_want(graph)) and inplace and mp.inplace:
        return mp
    return build_plan(graph, list(want), inplace_updates=inplace, schedule=schedule)
