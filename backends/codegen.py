"""The elementwise code generator: one loop plan, one expression translator, two dialects (Numba CPU
loop nests and CUDA grid-stride kernels). The model is tinygrad's CStyleLanguage with its small
CUDARenderer subclass.

An elementwise kernel computes a *body*: values t0, t1, ... each an op's ``scalar`` expression over
a0, a1, ... (its operands: kernel inputs, earlier body values or inlined constants), of which some
(the *results*) are stored. Inputs broadcast: the loop plan merges the loop dims (shapes.merge_loop_dims)
and says, per input, how it is read (``"const"``: a scalar constant inlined as a literal;
``"scalar"``: one value; ``"full"``: laid out like the output; else a tuple of flags, True where the
input runs along that loop dim). Op attributes reach the expression as literals (``{alpha}`` in a scalar
expression; see ``scalar_expr``). Every literal is typed as the kernel's dtype, so float32 kernels do
float32 arithmetic only.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass

from graphc import ops as optable
from graphc import shapes
from graphc.errors import BackendError

FUNCTIONS = ("exp", "log", "log1p", "expm1", "sqrt", "tanh", "sin", "cos", "floor", "ceil", "fabs", "pow",
             "abs", "min", "max", "where")
# Numba's fastmath flags for the CPU kernels that reduce (sums, pools, convolutions): reassociation and
# FMA contraction for speed, but no nnan/ninf, so comparisons with NaN (max pooling, ReLU) and inf keep
# their IEEE meaning. The elementwise and loss kernels generated here use none: they have no reduction
# to vectorise, and reassoc/afn would fold log(exp(x)) to x and sqrt(exp(x)) to exp(x/2) (finite
# where float32 numpy overflows), arcp turn x/y into x*(1/y) (inf where 1/y overflows), nsz lose -0.0.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
FASTMATH_SRC = "{" + ", ".join(repr(f) for f in sorted(FASTMATH)) + "}"     # the same, in generated source


def literal(v):
    """A number as expression text (attribute values, inlined constants)."""
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "(-inf)"
    return repr(v)


def scalar_expr(op, attrs):
    """The op's scalar expression with its attributes substituted ({alpha} -> (the value's literal); the
    op's defaults where the node has none): graphc.ops.scalar_expression with this generator's literals."""
    return optable.scalar_expression(op, attrs, literal)


def mean_loss(op):
    """(term, is_gradient) of a mean loss op: its formula over a0 (prediction) and a1 (target), written
    once in the op table (loss_term: the loss is the term's mean; grad_term: term * dy / element count)."""
    d = optable.OPS[op]
    return (d.loss_term, False) if d.loss_term is not None else (d.grad_term, True)


# ============================================================================================ loop plan

@dataclass
class LoopPlan:
    dims: tuple        # the merged loop dims
    modes: list        # per input: "const", "scalar", "full" or a tuple of flags per loop dim
    consts: dict       # input index -> inlined value (mode "const")

    @property
    def rank(self):
        return len(self.dims)

    def loaded(self):
        """Indices of the inputs the kernel takes as arrays (all but the inlined constants)."""
        return [k for k, m in enumerate(self.modes) if m != "const"]

    def input_shape(self, k):
        """The shape input k is viewed as by a loop-nest kernel (1 along the dims it does not run)."""
        m = self.modes[k]
        if m == "scalar":
            return (1,)
        if m == "full":
            return tuple(self.dims)
        return tuple(d if run else 1 for d, run in zip(self.dims, m))


def plan_loop(out_shape, in_shapes, consts=None):
    """The loop plan of an elementwise kernel writing `out_shape` from inputs of `in_shapes` (numpy
    broadcasting); consts: {input index: value} for inputs that are scalar constants (inlined)."""
    consts = dict(consts or {})
    dims, flags = shapes.merge_loop_dims(out_shape, in_shapes)
    total = shapes.numel(out_shape) or 1
    modes = []
    for k, s in enumerate(in_shapes):
        runs = tuple(fl[k] for fl in flags)
        if k in consts:
            modes.append("const")
        elif not any(runs):
            modes.append("scalar")
        elif (shapes.numel(s) or 1) == total:
            modes.append("full")
        else:
            modes.append(runs)
    return LoopPlan(tuple(dims), modes, consts)


# =========================================================================================== expressions

class _Translate(ast.NodeTransformer):
    """One scalar expression in a dialect: checks its names and calls, keeps the arithmetic in the
    kernel's dtype (literals typed, comparisons used as values become typed 1/0), writes where(c, x, y),
    min and max as conditionals (numba.cuda compiles builtin min/max only with a GPU present).
    With cast=False (kernels of an integer dtype) literals and calls are left untyped."""

    def __init__(self, src, operands, n_scalars, n_prev, dialect, cast):
        self.src, self.operands, self.n_scalars, self.n_prev = src, operands, n_scalars, n_prev
        self.dialect, self.cast = dialect, cast

    def _fail(self, msg):
        raise BackendError(f"elementwise expression {self.src!r}: {msg}")

    def _lit(self, text):
        return ast.parse(self.dialect.literal(text) if self.cast else text, mode="eval").body

    def _typed(self, node):
        if not self.cast:
            return node
        return ast.Call(func=ast.Name(id="_T", ctx=ast.Load()), args=[node], keywords=[])

    def _as_value(self, test):
        return ast.IfExp(test=test, body=self._lit("1"), orelse=self._lit("0"))

    def _test(self, node):
        """node used as a condition (no 1/0 conversion at its top)."""
        if isinstance(node, ast.Compare):
            node.left = self.visit(node.left)
            node.comparators = [self.visit(c) for c in node.comparators]
            return node
        if isinstance(node, ast.BoolOp):
            node.values = [self._test(v) for v in node.values]
            return node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            node.operand = self._test(node.operand)
            return node
        return ast.Compare(left=self.visit(node), ops=[ast.NotEq()], comparators=[self._lit("0")])

    def visit_Expression(self, node):
        node.body = self.visit(node.body)
        return node

    def visit_Constant(self, node):
        if isinstance(node.value, bool):
            return self._lit(str(int(node.value)))
        if isinstance(node.value, (int, float)):
            return self._lit(repr(node.value))
        self._fail(f"constant {node.value!r} is not a number")

    def visit_Name(self, node):
        nm = node.id
        if nm[:1] in "aso" and nm[1:].isdigit():
            k = int(nm[1:])
            limit, what = {"a": (len(self.operands), "operands"), "s": (self.n_scalars, "scalars"),
                           "o": (self.n_prev, "earlier outputs")}[nm[0]]
            if k >= limit:
                self._fail(f"{nm} is out of range: {limit} {what}")
            if nm[0] == "s":
                return ast.Name(id=self.dialect.scalar(k), ctx=ast.Load())
            if nm[0] == "o":
                return ast.Name(id=self.dialect.value(k), ctx=ast.Load())
            operand = self.operands[k]
            if isinstance(operand, str):
                return ast.Name(id=operand, ctx=ast.Load())
            return self.visit(ast.parse(literal(operand), mode="eval").body)     # an inlined constant
        if nm in ("inf", "nan", "pi", "e"):
            return self._typed(ast.Attribute(value=ast.Name(id="math", ctx=ast.Load()), attr=nm, ctx=ast.Load()))
        self._fail(f"unknown name {nm!r} (use a0..a{len(self.operands) - 1}, s0.., o0.. and "
                   f"{', '.join(FUNCTIONS)})")

    def visit_Call(self, node):
        fn = node.func.id if isinstance(node.func, ast.Name) else None
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "math":
            fn = node.func.attr                    # the op table writes math.exp(a0)
        if fn not in FUNCTIONS or node.keywords:
            self._fail(f"only calls of {', '.join(FUNCTIONS)} are allowed")
        if fn == "where":
            if len(node.args) != 3:
                self._fail("where takes (cond, x, y)")
            c, a, b = node.args
            return ast.IfExp(test=self._test(c), body=self.visit(a), orelse=self.visit(b))
        args = [self.visit(a) for a in node.args]
        if fn in ("min", "max"):
            if len(args) < 2:
                self._fail(f"{fn} takes at least 2 arguments")
            res = args[0]
            for nxt in args[1:]:
                op = ast.Gt() if fn == "max" else ast.Lt()
                res = ast.IfExp(test=ast.Compare(left=nxt, ops=[op], comparators=[res]), body=nxt, orelse=res)
            return self._typed(res)
        func = ast.Name(id="abs", ctx=ast.Load()) if fn == "abs" else \
            ast.Attribute(value=ast.Name(id="math", ctx=ast.Load()), attr=fn, ctx=ast.Load())
        return self._typed(ast.Call(func=func, args=args, keywords=[]))

    def visit_Compare(self, node):
        return self._as_value(self._test(node))

    def visit_BoolOp(self, node):
        return self._as_value(self._test(node))

    def visit_IfExp(self, node):
        return ast.IfExp(test=self._test(node.test), body=self.visit(node.body), orelse=self.visit(node.orelse))

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            return self._as_value(self._test(node))
        if isinstance(node.op, (ast.USub, ast.UAdd)):
            node.operand = self.visit(node.operand)
            return node
        self._fail(f"operator {type(node.op).__name__} is not allowed")

    def visit_BinOp(self, node):
        if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Mod, ast.FloorDiv)):
            self._fail(f"operator {type(node.op).__name__} is not allowed")
        node.left = self.visit(node.left)
        node.right = self.visit(node.right)
        return node

    def generic_visit(self, node):
        if isinstance(node, (ast.expr_context, ast.operator, ast.cmpop, ast.boolop, ast.unaryop)):
            return node
        self._fail(f"{type(node).__name__} is not allowed in an elementwise expression")


def translate(expr, operands, dialect, n_scalars=0, n_prev=0, cast=True):
    """`expr` (over a<k> = operands[k]: a variable name or a number; s<j> scalars; o<p> earlier
    values) as the dialect's Python text."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise BackendError(f"elementwise expression {expr!r} does not parse: {e}") from e
    tree = _Translate(expr, operands, n_scalars, n_prev, dialect, cast).visit(tree)
    return ast.unparse(tree.body)


# ============================================================================================== dialects

class Dialect:
    """How a kernel names its values and writes literals and loops."""
    value_prefix = "t"

    def __init__(self):
        self.consts = {}

    def value(self, j):
        return f"{self.value_prefix}{j}"

    def input(self, k):
        raise NotImplementedError

    def scalar(self, j):
        return f"_vs{j}"

    def literal(self, text):
        return f"_T({text})"

    def body(self, body, plan, n_scalars=0, cast=True):
        """Translated lines 'value = expr' of a body [(expr, refs)], refs[k] = ("in", i) | ("body", j)."""
        lines = []
        for j, (expr, refs) in enumerate(body):
            operands = [self.value(i) if kind == "body" else
                        (plan.consts[i] if plan.modes[i] == "const" else self.input(i)) for kind, i in refs]
            text = translate(expr, operands, self, n_scalars, j, cast)
            lines.append(f"{self.value(j)} = _T({text})")
        return lines


class NumbaDialect(Dialect):
    """A @njit loop nest over the merged loop dims (arrays viewed as LoopPlan.input_shape), the outer
    loop a prange when parallel; literals hoisted out of the loops as typed locals. Written to a file
    in the kernel cache (kernel_cache.load_generated) so Numba caches its machine code."""

    def input(self, k):
        return f"a{k}_"

    def literal(self, text):
        if text not in self.consts:
            self.consts[text] = f"c{len(self.consts)}"
        return self.consts[text]

    def source(self, body, results, plan, dtype, parallel):
        exprs = self.body(body, plan)
        loaded = plan.loaded()
        rank = plan.rank
        idx_all = [f"d{r}" for r in range(rank)]
        head, loads = [], []
        for k in loaded:
            m = plan.modes[k]
            if m == "scalar":
                head.append(f"    a{k}_ = i{k}[0]")
            else:
                runs = (True,) * rank if m == "full" else m
                loads.append(f"a{k}_ = i{k}[{', '.join(i if r else '0' for i, r in zip(idx_all, runs))}]")
        idx = ", ".join(idx_all)
        inner = loads + exprs + [f"o{r}[{idx}] = t{j}" for r, j in enumerate(results)]
        lines = ["# Generated by graphc.backends.codegen (elementwise) -- do not edit;",
                 "# the file name is a hash of this text.", "import math", "import numpy as np",
                 "from numba import njit, prange", "", f"_T = np.{dtype}", "",
                 f"@njit(parallel={parallel}, cache=True, nogil=True, error_model='numpy')",
                 "def kernel(" + ", ".join([f"o{r}" for r in range(len(results))] + [f"i{k}" for k in loaded]) + "):"]
        lines += [f"    {name} = _T({text})" for text, name in self.consts.items()] + head
        lines += [f"    n{r} = o0.shape[{r}]" for r in range(rank)]
        if parallel and rank == 1:
            lines += ["    nch = (n0 + 4095) // 4096", "    for ch in prange(nch):",
                      "        for d0 in range(ch * 4096, min(n0, ch * 4096 + 4096)):"]
            lines += ["            " + s for s in inner]
        else:
            ind = "    "
            for r in range(rank):
                lines.append(f"{ind}for d{r} in {'prange' if parallel and r == 0 else 'range'}(n{r}):")
                ind += "    "
            lines += [ind + s for s in inner]
        return "\n".join(lines) + "\n"


    def mean_loss_source(self, term, grad, dtype):
        """kernel(a, b, out): out[0] = mean of term(a, b), the term evaluated and summed in float64 (as
        the reference: a float32 square overflows where the loss does not); with grad,
        kernel(a, b, dy, out): out = term(a, b) * (dy / size), in the dtype (as the reference). a, b,
        out flat."""
        value = self.body([(term, [("in", 0), ("in", 1)])], LoopPlan((1,), ["full", "full"], {}))[0]
        lines = ["# Generated by graphc.backends.codegen (mean loss) -- do not edit;",
                 "# the file name is a hash of this text.", "import math", "import numpy as np",
                 "from numba import njit", "", f"_T = np.{dtype if grad else 'float64'}", "",
                 "@njit(cache=True, nogil=True, error_model='numpy')",
                 "def kernel(a, b, dy, out):" if grad else "def kernel(a, b, out):"]
        lines += [f"    {name} = _T({text})" for text, name in self.consts.items()]
        lines += ["    scale = _T(dy[0]) / _T(a.size)" if grad else "    s = 0.0", "    for i in range(a.size):",
                  "        a0_ = _T(a[i])", "        a1_ = _T(b[i])", "        " + value,
                  "        out[i] = t0 * scale" if grad else "        s += t0"]
        if not grad:
            lines.append("    out[0] = s / a.size")
        return "\n".join(lines) + "\n"


class CudaDialect(Dialect):
    """A 1-D grid-stride kernel over flat arrays, ``_ew_kernel(_n, outputs, loaded inputs, scalars, loop
    dims)``: inputs read at the flat index ("full"), once ("scalar") or at the index their coordinates in
    the merged loop dims give (broadcast; the dims _D<r> are arguments). Run through exec with ``cuda``,
    ``math`` and ``_T`` (the dtype) in its namespace, then jitted."""
    value_prefix = "_vo"

    def input(self, k):
        return f"_va{k}"

    def source(self, body, results, plan, n_scalars=0, cast=True):
        exprs = self.body(body, plan, n_scalars, cast)
        loaded = plan.loaded()
        rank = plan.rank if any(isinstance(plan.modes[k], tuple) for k in loaded) else 0
        args = ["_n"] + [f"_out{r}" for r in range(len(results))] + [f"_in{k}" for k in loaded]
        args += [self.scalar(j) for j in range(n_scalars)] + [f"_D{r}" for r in range(rank)]
        lines = [f"def _ew_kernel({', '.join(args)}):", "    _start = cuda.grid(1)", "    _step = cuda.gridsize(1)",
                 "    for _i in range(_start, _n, _step):"]
        if rank:
            lines.append("        _q = _i")
            for r in reversed(range(1, rank)):
                lines += [f"        _c{r} = _q % _D{r}", f"        _q = _q // _D{r}"]
            lines.append("        _c0 = _q")
        for k in loaded:          # read as the kernel's dtype (a float64 loss term over float32 inputs)
            m = plan.modes[k]
            if m == "full":
                idx = "_i"
            elif m == "scalar":
                idx = "0"
            else:
                run = [r for r in range(rank) if m[r]]
                idx = f"_c{run[0]}"
                for r in run[1:]:
                    idx = f"({idx}) * _D{r} + _c{r}"
            lines.append(f"        _va{k} = _T(_in{k}[{idx}])" if cast else f"        _va{k} = _in{k}[{idx}]")
        lines += ["        " + e for e in exprs]
        lines += [f"        _out{r}[_i] = _vo{j}" for r, j in enumerate(results)]
        return "\n".join(lines) + "\n", rank


def graph_body(nodes):
    """[(scalar expression with attributes substituted, refs)] of elementwise body node dicts."""
    return [(scalar_expr(b["op"], b.get("attrs")), list(b["inputs"])) for b in nodes]
