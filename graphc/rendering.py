"""gc.render(graph, path): the graph drawn with Graphviz, as the course slides draw it.

    gc.render(g, "lenet5.svg")                                  # forward: green edges
    gc.render(g, "lenet5_backward.svg", backward=True)          # + backward beside it: red edges, each
                                                                #   labelled with its gate rule
    gc.render(seed_cnn, "trace.svg", backward=True,
              values={"x": SEED_X, "labels": SEED_LABELS})      # every value and gradient written on
    gc.render(vgg16, "vgg16.svg", backward=True, collapse=True) # repeated blocks merged: conv3_[1-3] x3

What is drawn (the scene: graphc.render_scene; collapsed: graphc.render_collapse)
-----------------------------------------------------------------------------------
* One box per value (graphc has one value per node): its op, its name and its output shape. Inputs are
  blue houses, parameters amber cylinders (optimizer state dashed), constants grey notes, forward ops
  green boxes, backward (gradient) ops red boxes, optimizer updates purple; graph outputs have a double
  border. A legend under the title says so (``legend=False`` leaves it out).
* Forward edges are green. Gradient edges (out of a backward node) are red and labelled with the gate
  rule on the edge (the ``rule`` attribute the autodiff pass puts on every edge into a backward node:
  ``add:distribute``, ``matmul:swap``, ``copy:add``, ``max:route``, ``conv:dW``, ``pool:route``, ...).
  A forward value read by a gradient rule (the other input of a swap multiplier, the saved input of a
  max router) is joined to it by a thin dashed grey edge that does not constrain the layout.
* ``compact=True`` (default) makes backward graphs readable: an identity node (``add:distribute``'s
  pass-through, the ``grad/<param>`` outputs) is left out and its rule stays on the edge that replaces
  it (``add:distribute -> matmul:swap``); a scalar constant is written into the node that reads it
  (``gt(., 0)``) instead of drawn with edges across the picture; a gradient node is titled
  ``dL/d<value>`` and the automatic names (``mul4``, ``gt3``) move to the tooltips. With values, a
  node's tooltip in the SVG holds its whole array (labels show 16 numbers at most).
* Any node with a ``body`` (the ``fused`` op: attrs ``pattern``, ``body``, ``results``; see
  graphc.ops.fused) is a cluster named after its kernel pattern, holding its body nodes under their
  original names, so a reader sees which gates became which kernel. ``getitem`` nodes that pick a
  result of a fused node are drawn as that result inside the cluster.

Layouts (``backward=True`` or a graph that already holds backward nodes)
-------------------------------------------------------------------------
* ``mirror`` (default): the backward graph mirrored beside the forward one; each gradient node is
  ranked with the value it is the gradient of (forward on the left, its gradient to its right) and
  gradient edges run back the way the forward ones came, as on the slides.
* ``separate``: forward and backward in two clusters; the forward values a rule reads are small dashed
  ghosts beside it, so no edge crosses between the two.
* ``backward-only``: just the backward nodes, with the same ghosts.

Rank direction defaults to TB (top to bottom) when gradients or values are drawn or the graph is long,
else LR (the slides' left-to-right). ``collapse=True`` merges each layer (``conv3_1``, ``conv3_1.w``,
``conv3_1.b``, ``conv3_1.relu``) into one node, its backward into one ``d conv3_1`` node, and runs of
identical consecutive layers into one (``conv3_[1-3] x3``), so VGG16's backward fits a page; a fused
kernel joins the layer of its first body value.

Output
------
``render`` returns a Rendering: the DOT source as a str (as it always was) that Jupyter displays as the
picture (``_repr_svg_``). Given a path, it writes the format named by ``format`` or the extension: svg,
png, pdf (laid out by Graphviz's ``dot`` engine: pygraphviz in-process when installed, else the ``dot``
program; ``dpi`` sets a PNG's resolution), dot (the source), json (networkx node-link data with every
attribute). When no layout engine can be found the .dot file is written next to the target and a
GraphError says how to get one.
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

from graphc.errors import GraphError
from graphc.files import atomic_write, check_writable
from graphc.render_collapse import collapsed_scene
from graphc.render_scene import (BACKWARD_COLOR, EDGE, FORWARD_COLOR, SAVED_COLOR, STYLE, UPDATE_COLOR,  # noqa: F401
                                 full_scene, role_of)
from graphc.render_scene import compact as compact_scene
from graphc.render_values import compute_values, example_feeds, fmt_number, fmt_value, to_json  # noqa: F401

FORMATS = ("svg", "png", "pdf", "dot", "json")
LAYOUTS = ("mirror", "separate", "backward-only")

ENGINE_HINT = ("install a Graphviz layout engine: `pip install pygraphviz` (bundles Graphviz, renders "
               "in-process) or `apt-get install graphviz` (the `dot` program)")


# ------------------------------------------------------------------------------------------ emission

def _depth(sc):
    """Longest forward chain of the scene (decides LR for short graphs, TB for long ones)."""
    import networkx as nx
    h = nx.DiGraph()
    h.add_nodes_from(n for n, d in sc.nodes.items() if d["role"] == "forward")
    h.add_edges_from((e[0], e[1]) for e in sc.edges if e[2] == "forward")
    try:
        return nx.dag_longest_path_length(h) + 1 if len(h) else 0
    except nx.NetworkXUnfeasible:
        return len(h)


def _html(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_LEGEND_NODES = (   # kind -> (legend text, fill, border)
    ("input", "input", "#e3f2fd", "#1565c0"), ("param", "parameter", "#fff8e1", "#ff8f00"),
    ("state", "state (not trained)", "#f5f5f5", "#757575"), ("const", "constant", "#f5f5f5", "#757575"),
    ("forward", "forward op", "#e8f5e9", FORWARD_COLOR),
    ("backward", "gradient dL/d&#8230;", "#ffebee", BACKWARD_COLOR),
    ("update", "optimizer update", "#f3e5f5", UPDATE_COLOR), ("ghost", "forward value (read)", "#ffffff", SAVED_COLOR))
_LEGEND_EDGES = (   # edge kind -> (legend text, colour)
    ("forward", "&#8594; forward", FORWARD_COLOR), ("gradient", "&#8592; gradient, labelled with its gate rule",
                                                     BACKWARD_COLOR),
    ("saved", "- - &#8594; a value a gradient rule reads", SAVED_COLOR), ("update", "&#8594; update", UPDATE_COLOR))


def _legend_label(sc, title, values):
    """The picture's title with a legend of what its colours, shapes, borders and dashes mean: an
    HTML-like Graphviz label, laid out above the graph without moving any of it."""
    kinds = {d["kind"].replace("backward-const", "const") for d in sc.nodes.values()}
    edges = {e[2] for e in sc.edges} | ({"saved"} if "ghost" in kinds else set())
    cells = [f'<TD BGCOLOR="{fill}" COLOR="{border}" BORDER="1" STYLE="rounded">{text}</TD>'
             for kind, text, fill, border in _LEGEND_NODES if kind in kinds]
    if any(d["output"] for d in sc.nodes.values()):
        cells.append('<TD BORDER="2" STYLE="rounded">output (double border)</TD>')
    if sc.clusters:
        cells.append('<TD BORDER="1" STYLE="dashed">fused kernel (dashed frame)</TD>')
    cells += [f'<TD><FONT COLOR="{colour}">{text}</FONT></TD>' for kind, text, colour in _LEGEND_EDGES
              if kind in edges]
    if values:
        cells.append("<TD>= value (hover: the whole array)</TD>")
    rows = [cells[i:i + 5] for i in range(0, len(cells), 5)]
    body = "".join(f'<TR><TD><TABLE BORDER="0" CELLSPACING="3" CELLPADDING="2"><TR>{"".join(r)}</TR></TABLE></TD></TR>'
                   for r in rows)
    return (f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1"><TR><TD><FONT POINT-SIZE="12">{_html(title)}'
            f'</FONT></TD></TR>{body}</TABLE>>')


def _ghost_reads(sc):
    """The separate and backward-only layouts: a forward value a gradient rule reads is drawn as a small
    dashed ghost beside each rule that reads it, so no edge crosses between the forward and backward
    parts (the mirror layout joins them instead)."""
    new_edges = []
    for e in sc.edges:
        t, h, kind = e[0], e[1], e[2]
        if kind != "saved" or sc.nodes[h]["role"] == "forward":
            new_edges.append(e)
            continue
        gid = f"{t}@{h}"
        src = sc.nodes[t]
        sc.nodes[gid] = dict(label=src["label"].split("\\n")[0], kind="ghost", role="ghost", cluster=None,
                             output=False, tooltip=src.get("tooltip"), info=None)
        new_edges.append([gid, h, "ghost", None, None])
    sc.edges = new_edges


def _emit(sc, label, layout, rankdir, has_backward, dpi=None):
    import graphviz
    graph_attr = dict(rankdir=rankdir, label=label, labelloc="t", fontname="Helvetica", fontsize="12",
                      nodesep="0.25", ranksep="0.35", newrank="true", compound="true")
    if dpi:
        graph_attr["dpi"] = f"{float(dpi):g}"
    dot = graphviz.Digraph("graphc", graph_attr=graph_attr,
                           node_attr=dict(fontname="Helvetica", fontsize="9", margin="0.08,0.03", height="0.3"),
                           edge_attr=dict(fontname="Helvetica", fontsize="8", arrowsize="0.7"))
    reverse_gradients = has_backward and layout == "mirror"

    def sid(nid):          # the graphviz package reads "a:b" in an edge as node a, port b
        return nid.replace(":", "%3A")

    def node_attrs(nid):
        d = sc.nodes[nid]
        attrs = dict(STYLE[d["kind"]])
        attrs["class"] = f"graphc-{d['kind']} graphc-{d['role']}"
        if d["output"]:
            attrs["peripheries"] = "2"
        if d.get("tooltip"):
            attrs["tooltip"] = d["tooltip"].replace("\\", "\\\\").replace("\n", "&#10;")
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
        for role, title in (("forward", "forward"), ("backward", "backward (gradients)"), ("update", "update")):
            ids = [n for n in free if sc.nodes[n]["role"] == role or (role == "backward" and
                                                                      sc.nodes[n]["role"] == "ghost")]
            cids = [c for c, cd in sc.clusters.items() if cd["role"] == role]
            if not ids and not cids:
                continue
            color = {"forward": FORWARD_COLOR, "backward": BACKWARD_COLOR, "update": UPDATE_COLOR}[role]
            with dot.subgraph(name=f"cluster_role_{role}") as sub:
                sub.attr(label=title, color=color, fontcolor=color, style="rounded")
                add_nodes(sub, ids)
                add_clusters(sub, cids)
    else:
        add_nodes(dot, free)
        add_clusters(dot, list(sc.clusters))

    for t, h, kind, rule, value in sc.edges:
        attrs = dict(EDGE.get(kind, EDGE["saved"] if kind == "ghost" else {}))
        if kind == "ghost":
            attrs.pop("constraint", None)                     # a ghost sits just above the rule reading it
        text = "\\n".join(x for x in (rule, value) if x)
        if text:
            attrs["label"] = text
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


def _no_engine(path, source):
    dot_path = os.path.splitext(path)[0] + ".dot"
    atomic_write(dot_path, lambda f: f.write(source), "DOT source", binary=False)
    return GraphError(f"cannot lay out {os.path.basename(path)}: no Graphviz layout engine found "
                      f"(neither pygraphviz nor a `dot` program); wrote the DOT source to {dot_path}. "
                      f"To render it, {ENGINE_HINT}")


def draw(source, fmt) -> bytes:
    """Lays out a DOT source with Graphviz's dot engine (pygraphviz in-process, else the `dot` program)
    into `fmt` (svg, png, pdf); a GraphError when neither is available."""
    engine = _engine()
    if engine is None:
        raise GraphError(f"cannot lay out the graph: no Graphviz layout engine found; {ENGINE_HINT}")
    if engine == "pygraphviz":
        import pygraphviz
        with _quiet_fontconfig():
            return pygraphviz.AGraph(string=source).draw(None, prog="dot", format=fmt)
    import graphviz
    return graphviz.pipe("dot", fmt, source.encode())


def _layout(source, path, fmt):
    if _engine() is None:
        raise _no_engine(path, source)
    data = draw(source, fmt)
    atomic_write(path, lambda f: f.write(data), "rendering")


class Rendering(str):
    """What render() returns: the DOT source (a str, as before: print it, save it, search it) that
    Jupyter displays as the picture (``_repr_svg_``). ``.svg()`` and ``.png()`` lay it out."""

    def __new__(cls, source, path=None):
        obj = super().__new__(cls, source)
        obj.path = path
        return obj

    @property
    def source(self) -> str:
        return str(self)

    def svg(self) -> str:
        if "_svg" not in self.__dict__:
            self.__dict__["_svg"] = draw(str(self), "svg").decode("utf-8", errors="replace")
        return self.__dict__["_svg"]

    def png(self) -> bytes:
        return draw(str(self), "png")

    def _repr_svg_(self):
        try:
            return self.svg()
        except GraphError:
            return None              # no layout engine: Jupyter shows the text instead


def _has_backward(g):
    return any(role_of(d) != "forward" for _, d in g.nx.nodes(data=True))


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


def _check_args(graph, layout, rankdir, path, format):
    """The output format (None without a path); GraphError for a bad argument."""
    from graphc.graph import Graph
    if not isinstance(graph, Graph):
        raise GraphError(f"render() takes a graphc.Graph, got {type(graph).__name__}")
    if layout not in LAYOUTS:
        raise GraphError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if rankdir is not None and str(rankdir).upper() not in ("TB", "LR", "BT", "RL"):
        raise GraphError(f"rankdir must be TB, LR, BT or RL, got {rankdir!r}")
    fmt = None
    if path is not None:
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        fmt = (format or ext or "").lower()
        if fmt == "gv":
            fmt = "dot"
        if fmt not in FORMATS:
            what = f"unknown format {format!r}" if format else f"cannot tell the output format of {path!r}"
            raise GraphError(f"{what}; choose one of {', '.join(FORMATS)} (format=... or the file's extension)")
    elif format is not None and format.lower() not in FORMATS:
        raise GraphError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _title(name, layout, has_backward, collapse, vals, legend):
    if legend:                      # the legend says what the colours mean
        what = ("backward" if layout == "backward-only" else "forward and backward") if has_backward else "forward"
    else:
        what = {"mirror": "forward (green) and backward (red, edges labelled with gate rules)",
                "separate": "forward (green) and backward (red, edges labelled with gate rules)",
                "backward-only": "backward (red, edges labelled with gate rules)"}[layout] \
            if has_backward else "forward"
    return f"{name}: {what}" + (", collapsed" if collapse else "") + (", with values" if vals is not None else "")


def render(graph, path=None, format=None, backward=False, layout="mirror", fused=None, values=None,
           collapse=False, rankdir=None, max_label=28, title=None, compact=True, legend=True, dpi=None):
    """Draws `graph` with Graphviz; returns a Rendering (the DOT source as a str, displayed as the
    picture in Jupyter) and writes `path` when given.

    backward   True: draw gc.grad(graph) (or the graph itself if it already has backward nodes).
    layout     "mirror" (backward beside the forward, gradients ranked with their values),
               "separate" (two clusters) or "backward-only".
    fused      True: run the numba pipeline's passes (fusion) first; False: draw fused nodes as single
               boxes; None: draw the graph as given, a fused node's body as a cluster.
    values     a feed dict (or True for example feeds): run the graph on the reference backend in float64
               and write every value on its node and every gradient on its edge (whole arrays: tooltips).
    collapse   merge each layer and runs of identical layers into single nodes (for VGG16, AlexNet).
    compact    elide identity nodes (their rule stays on the edge), write scalar constants into the nodes
               that read them, title gradient nodes dL/d<value> (False: one drawn node per graph node).
    legend     a legend of the colours, shapes, borders and dashes under the title.
    rankdir    "LR", "TB", ... (default: TB when gradients or values are drawn or the graph is long, else LR).
    max_label  longest name shown in a label before it is shortened.
    dpi        resolution of PNG output.
    format     svg, png, pdf, dot or json (default: the extension of `path`)."""
    path = os.fspath(path) if path is not None else None
    fmt = _check_args(graph, layout, rankdir, path, format)
    if path is not None:
        check_writable(path, "rendering")          # before the layout work, not after
    g = prepare(graph, backward, fused, layout)
    vals = None
    if values is not None and values is not False:
        vals = compute_values(g, example_feeds(graph) if values is True else values)
    has_backward = _has_backward(g)
    opts = dict(max_label=max_label, expand_fused=fused is not False)
    unfused = prepare(graph, backward, None, layout) if collapse and fused else None
    sc = collapsed_scene(g, vals, opts, unfused) if collapse else full_scene(g, vals, opts)
    if compact and not collapse:
        compact_scene(sc, g, vals)
    if layout == "backward-only" and has_backward:
        _keep_backward_only(sc)
    elif layout == "separate" and has_backward:
        _ghost_reads(sc)
    if rankdir is None:
        rankdir = "TB" if has_backward or vals is not None or _depth(sc) > 12 else "LR"
    title = title if title is not None else _title(graph.name, layout, has_backward, collapse, vals, legend)
    label = _legend_label(sc, title, vals is not None) if legend else title
    source = _emit(sc, label, layout, str(rankdir).upper(), has_backward, dpi).source
    if path is not None:
        if fmt == "dot":
            atomic_write(path, lambda f: f.write(source), "rendering", binary=False)
        elif fmt == "json":
            data = to_json(g, vals)
            atomic_write(path, lambda f: json.dump(data, f, indent=1), "rendering", binary=False)
        else:
            _layout(source, path, fmt)
    return Rendering(source, path)


def _keep_backward_only(sc):
    """Drops the forward nodes; the forward values a gradient rule reads stay as dashed ghosts, one
    beside each rule that reads them."""
    for cid, c in list(sc.clusters.items()):
        if c["role"] == "forward":
            del sc.clusters[cid]
    _ghost_reads(sc)
    for n in [n for n, d in sc.nodes.items() if d["role"] == "forward"]:
        del sc.nodes[n]
    sc.edges = [e for e in sc.edges if e[0] in sc.nodes and e[1] in sc.nodes]
    sc.partner = {}


def dot_stats(source) -> dict:
    """Counts in a DOT source made by render(): nodes, visible edges, edges by colour, clusters, labels
    (for tests and for `graphc render`'s summary line)."""
    node_re = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|[\w.]+)\s*\[(?!.*->)')
    nodes, edges, colours, clusters, labels = 0, 0, defaultdict(int), 0, []
    for line in source.splitlines():
        s = line.strip()
        if re.match(r'subgraph "?cluster_', s) and not re.match(r'subgraph "?cluster_role_', s):
            clusters += 1               # fused kernels (not the separate layout's forward/backward frames)
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
