"""Seeded random weights in place of an ONNX model's placeholder ones.

The onnx wheel's light/ models (AlexNet, ResNet50, VGG19, ...) build every weight at run time with
ConstantOfShape: all 0.02, so their output is a uniform softmax that hides any error. `randomize` swaps
those for seeded random initializers scaled to keep activations O(1) (conv and dense weights by fan-in,
batch norm scales and variances in safe ranges); with initializers=True it also replaces the float
initializers that feed a weight slot (Conv, ConvTranspose, Gemm, MatMul, BatchNormalization), for
`graphc bench model.onnx --random-weights SEED`.
"""
from __future__ import annotations

import numpy as np

# op -> the input slots that hold weights (slot 0 is the data)
WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                "BatchNormalization": (1, 2, 3, 4)}


def _fan_in(node, shape):
    n = int(np.prod(shape))
    if node.op_type in ("Conv", "ConvTranspose"):
        return max(1, n // shape[0])
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        return shape[-1] if trans_b else shape[0]
    return shape[0]                                      # MatMul: (K, N)


def weight(rng, consumer, slot, shape):
    """A seeded random weight for input `slot` of `consumer` (an onnx NodeProto or None)."""
    op = consumer.op_type if consumer is not None else ""
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and slot == 1 and len(shape) >= 2:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / _fan_in(consumer, shape)))
    if op == "BatchNormalization" and slot == 4:          # running variance
        return rng.uniform(1.0, 2.0, shape).astype(np.float32)
    if (op == "BatchNormalization" and slot == 1) or op == "Mul":   # scales: residual sums stay O(1)
        return rng.uniform(0.2, 0.6, shape).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def _users(model):
    users = {}
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            users.setdefault(i, (n, k))
    return users


def constant_weights(model):
    """The ConstantOfShape nodes with a constant shape that make a model's weights (light/ models)."""
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "ConstantOfShape" and n.input and n.input[0] in inits]


def randomize(model, seed=0, initializers=False):
    """(model, number of tensors replaced): the model, changed in place, with every ConstantOfShape weight
    replaced by a seeded random initializer; with `initializers`, the float initializers in weight
    slots too (drawn after the ConstantOfShape ones, so those do not depend on it)."""
    from onnx import numpy_helper
    rng = np.random.default_rng(seed)
    m = model
    inits = {t.name: t for t in m.graph.initializer}
    users = _users(m)
    made = {id(n) for n in constant_weights(m)}
    keep, new_inits, dropped = [], [], set()
    for n in m.graph.node:
        if id(n) not in made:
            keep.append(n)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[n.input[0]]))
        consumer, slot = users.get(n.output[0], (None, 0))
        new_inits.append(numpy_helper.from_array(weight(rng, consumer, slot, shape), n.output[0]))
        dropped.add(n.input[0])
    count = len(new_inits)
    rest = []
    for t in m.graph.initializer:
        if t.name in dropped:
            continue
        consumer, slot = users.get(t.name, (None, 0))
        if (initializers and t.data_type == 1 and consumer is not None
                and slot in WEIGHT_SLOTS.get(consumer.op_type, ()) and len(t.dims) >= 1):
            t = numpy_helper.from_array(weight(rng, consumer, slot, tuple(t.dims)), t.name)
            count += 1
        rest.append(t)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    del m.graph.initializer[:]
    m.graph.initializer.extend(rest + new_inits)
    inputs = [v for v in m.graph.input if v.name not in dropped]      # IR 3 lists initializers as inputs
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    return m, count
