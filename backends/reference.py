"""The reference backend: interprets any graph with the op table's numpy semantics. The oracle."""
import networkx as nx

from graphc import ops as optable
from graphc import shapes
from graphc.executable import Executable, RunContext


class ReferenceExecutable(Executable):
    backend = "reference"

    def __init__(self, graph, dtype=None, pipeline=None):
        super().__init__(graph, dtype, pipeline)
        self.schedule = getattr(graph, "schedule", None) or graph.topo()
        self.consts = {n: self._cast(graph.nx.nodes[n]["attrs"]["value"], graph.nx.nodes[n]["dtype"])
                       for n in self.schedule if graph.nx.nodes[n]["op"] == "const"}
        self._plans = {}

    def _needed(self, want):
        """The schedule restricted to what `want` depends on (a training graph's run() skips backward)."""
        key = tuple(want)
        if key not in self._plans:
            need = set(want)
            for w in want:
                need |= nx.ancestors(self.graph.nx, w)
            self._plans[key] = [n for n in self.schedule if n in need]
        return self._plans[key]

    def _execute(self, feeds, env, training, want):
        nodes = self.graph.nx.nodes
        ctx = RunContext(env, training, self.step_count)
        vals = {}
        for name in self._needed(want):
            nd = nodes[name]
            op = nd["op"]
            if op == "input":
                vals[name] = feeds[name]
            elif op == "param":
                vals[name] = self.state[name]
            elif op == "const":
                vals[name] = self.consts[name]
            else:
                ctx.out_shape = shapes.resolve(nd["shape"], env)
                out = optable.OPS[op].ref([vals[i] for i in nd["inputs"]], nd["attrs"], ctx)
                if not isinstance(out, tuple) and out.dtype != self.dtype and out.dtype.kind == "f":
                    # (a fused node with several results gives a tuple; its getitem nodes read it)
                    out = out.astype(self.dtype)
                vals[name] = out
        return vals


def lower(graph, dtype=None, pipeline=None, **options):
    return ReferenceExecutable(graph, dtype, pipeline)
