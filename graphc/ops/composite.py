"""Gradients of ops that equal a small composition of table ops.

Some ops exist so a backend can run in one or two passes what would otherwise be a chain of reductions
and elementwise ops (batch norm's and LRN's backward: graphc/ops/norm_grad.py). Their gradient rule
is the gradient of that composition: ``vjp`` builds the composition into the graph being
differentiated and runs the gate rules of its nodes in reverse, so the op is differentiable to any
order and its gradient is itself an explicit graph of table ops.
"""
from graphc.ops import OPS


def vjp(g, build, inputs, cotangent):
    """[gradient of `inputs` (None where none flows)] of ``build(g, *inputs)``, a value made of table ops,
    given the cotangent of that value (reverse mode over the nodes build adds, by their gate rules)."""
    before = set(g.nx.nodes)
    out = build(g, *inputs)
    new = [n for n in g.topo() if n not in before]
    grads = {out.name: cotangent}
    for name in reversed(new):
        dy = grads.pop(name, None)
        if dy is None:
            continue
        node = g.node(name)
        opdef = OPS[node.op]
        if opdef.source or not opdef.differentiable:
            continue
        for x, gx in zip(node.inputs, opdef.grad(g, node, dy)):
            if gx is not None:
                grads[x.name] = g.add(grads[x.name], gx) if x.name in grads else gx
    return [grads.get(v.name) for v in inputs]
