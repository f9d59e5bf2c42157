"""The lowering registries (backends/registry.py): the kernel tables, the profile's kinds and the fallback
lists are generated from what each backend registers."""
import numpy as np
import pytest

import graphc as gc
from graphc import ops as optable
from graphc.backends import registry
from graphc.backends.numba import kernel_table


def test_kernel_table_rows_come_from_the_registrations():
    reg = registry.registry("numba")
    table = dict(kernel_table())
    assert table["conv"] == reg.ops["conv"].kernel
    assert table["relu"] == reg.scalar_lowering().kernel                  # every scalar op: the generator
    assert table["reshape"] == registry.VIEW
    assert {f"fused:{p}" for p in reg.patterns} <= set(table)
    fallback = [op for op in optable.OPS if not optable.OPS[op].source and op != "fused"
                and op not in reg.ops and optable.OPS[op].scalar is None and not registry.is_view(op)]
    assert reg.fallback_ops() == sorted(fallback) and all(table[op] == registry.FALLBACK for op in fallback)


def test_a_registration_changes_the_table_and_a_lowering_may_decline():
    reg = registry.Registry("test")
    lowering, pattern_lowering = reg.lowering, reg.pattern_lowering

    @lowering("maxpool", "avgpool", kernel="one function for two ops")
    def pools(ctx):
        return None                                     # declines: the reference runs it
    table = dict(reg.kernel_table())
    assert table["maxpool"] == table["avgpool"] == "one function for two ops"
    assert table["conv"] == registry.FALLBACK and "conv" in reg.fallback_ops()
    with pytest.raises(ValueError):
        lowering("maxpool", kernel="again")(pools)
    assert reg.for_node("maxpool", {}).fn is pools and reg.for_node("fused", {"pattern": "nope"}) is None


def test_profile_kinds_and_kernels_come_from_the_registry():
    g = gc.Graph("p")
    x = g.input("x", (None, 1, 6, 6))
    h = g.maxpool(g.relu(g.conv(x, g.param("w", (2, 1, 3, 3)), g.param("b", (2,)), pad=1)), 2)
    g.output(g.add(g.flatten(h), 1.0, name="y"), g.maxpool_gather(x, x, (2, 2), (2, 2)))
    exe = gc.compile(g, backend="numba")
    rows = exe.profile({"x": np.ones((2, 1, 6, 6), np.float32)}, repeats=1, warmup=0)
    kinds = {r["kind"]: r for r in rows}
    reg = registry.registry("numba")
    assert kinds["conv_relu_maxpool"]["kernel"] == reg.patterns["conv_relu_maxpool"].kernel
    assert kinds["elementwise"]["kernel"] == reg.scalar_lowering().kernel
    gather = kinds["maxpool_gather"]                                        # no numba lowering
    assert gather["fallback"] and gather["kernel"] == registry.FALLBACK
    assert exe.fallbacks() == [gather["name"]]
