"""gc.render: structure of the DOT it makes (not pixels), real SVG/PNG/PDF through pygraphviz, the seed
example's numbers on the trace, JSON export, the no-layout-engine path."""
import json
import re
import shutil
import sys

import networkx as nx
import numpy as np
import pytest

import graphc as gc
from graphc import rendering
from graphc.errors import GraphError
from graphc.models import SEED_LABELS, SEED_X
from graphc.passes.transforms.autodiff import grad
from graphc.rendering import BACKWARD_COLOR, FORWARD_COLOR, SAVED_COLOR, dot_stats

SEED_FEEDS = {"x": SEED_X, "labels": SEED_LABELS}
LENET_RULES = {"matmul:swap", "add:distribute", "max:route", "conv:dW", "conv:dX-fullconv", "conv:db",
               "pool:route", "softmax-ce:(O-y)/m", "reshape:undo"}


# LeNet-5's graph counted from its layers (not copied from output): inputs x and labels; per conv layer
# w, b + conv, relu, maxpool; flatten; per hidden dense layer w, b + matmul, add, relu; the logits layer
# w, b + matmul, add; the loss.
LENET_NODES = 2 + 2 * (2 + 3) + 1 + 2 * (2 + 3) + (2 + 2) + 1                      # = 28
# edges = the inputs each op reads: conv 3, relu 1, maxpool 1; flatten 1; matmul 2, add 2, relu 1; loss 2
LENET_EDGES = 2 * (3 + 1 + 1) + 1 + 2 * (2 + 2 + 1) + (2 + 2) + 2                   # = 27

# Its backward graph by gate rule (parameter gradients only: the image x gets no dL/dx), per forward
# op: (how many, backward nodes each, gradient edges into them, forward values they read)
LENET_BACKWARD = {
    "seed dloss/dloss = 1": (1, 1, 0, 0),
    "softmax-ce:(O-y)/m": (1, 1, 1, 2),                  # reads the seed; logits, labels
    "add:distribute (bias)": (3, 3, 3, 1),               # identity x2, sum_to (reads the bias for its shape)
    "matmul:swap": (3, 2, 2, 2),                         # dX reads w, dW reads the layer input
    "max:route (relu = max(x, 0))": (4, 2, 3, 1),        # gt(pre-activation, 0), mul(dy, gt)
    "the 0 the four ReLU masks share": (1, 1, 0, 0),
    "reshape:undo (flatten)": (1, 1, 1, 1),              # reshape_like reads s4
    "pool:route": (2, 1, 1, 1),                          # maxpool_route reads the ReLU output
    "conv c3: dX, dW, db": (1, 3, 3, 2),                 # conv_dx reads c3.w, conv_dw reads s2
    "conv c1: dW, db (no dL/dx)": (1, 2, 2, 1),          # conv_dw reads x
    "grad/<param> outputs": (10, 1, 1, 0),
}
LENET_BWD_NODES, LENET_GRAD_EDGES, LENET_SAVED_EDGES = (
    sum(k * v[i] for k, *v in LENET_BACKWARD.values()) for i in range(3))           # = 44, 46, 21


def have_pygraphviz():
    try:
        import pygraphviz  # noqa: F401
        return True
    except ImportError:
        return False


needs_engine = pytest.mark.skipif(not have_pygraphviz() and not shutil.which("dot"),
                                  reason="no Graphviz layout engine (pip install pygraphviz)")


@pytest.fixture(scope="module")
def lenet():
    return gc.models.load("lenet5")


@pytest.fixture(scope="module")
def lenet_grad(lenet):
    return grad(lenet, keep_outputs=True)


def edge_lines(src):
    return [line.strip() for line in src.splitlines() if "->" in line and "style=invis" not in line]


def node_labels(src):
    """node id -> label text (escaped newlines kept as \\n)."""
    out = {}
    for line in src.splitlines():
        m = re.match(r'\s*("(?:[^"\\]|\\.)*"|[\w.]+) \[label="((?:[^"\\]|\\.)*)"', line)
        if m and "->" not in line:
            out[m.group(1).strip('"')] = m.group(2)
    return out


def numbers(text):
    return [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", text)]


# ------------------------------------------------------------------------------------------ structure

def test_lenet_forward_counts_and_colours(lenet):
    src = gc.render(lenet)
    st = dot_stats(src)
    # one drawn node per value and one drawn edge per graph edge, all forward (green)
    assert st["nodes"] == len(lenet.nx) == LENET_NODES
    assert st["edges"] == lenet.nx.number_of_edges() == LENET_EDGES
    assert st["colours"] == {FORWARD_COLOR: LENET_EDGES}
    assert st["clusters"] == 0 and st["edge_labels"] == []
    labels = node_labels(src)
    assert labels["c1"] == "c1: conv\\n(N, 6, 28, 28)"          # op, name, output shape
    assert labels["s4"] == "s4: maxpool\\n(N, 16, 5, 5)"
    assert "rankdir=TB" in src                                   # 17 ranks deep: top to bottom
    # inputs, params and ops styled apart; the loss output has a double border
    assert re.search(r'^\s*x \[.*shape=invhouse', src, re.M)
    assert re.search(r'^\s*"c1.w" \[.*shape=cylinder', src, re.M)
    assert re.search(r'^\s*c1 \[.*shape=box', src, re.M)
    assert re.search(r'^\s*loss \[.*peripheries=2', src, re.M)


def test_lenet_backward_counts_colours_and_rules(lenet, lenet_grad):
    src = gc.render(lenet, backward=True, compact=False)         # one drawn node per graph node
    st = dot_stats(src)
    b = lenet_grad
    roles = nx.get_node_attributes(b.nx, "role")
    n_grad = sum(1 for u, v in b.nx.edges if roles[v] == "backward" and roles[u] == "backward")
    n_saved = sum(1 for u, v in b.nx.edges if roles[v] == "backward" and roles[u] == "forward")
    n_fwd = sum(1 for u, v in b.nx.edges if roles[v] == "forward")
    # derived from the graph ...
    assert st["nodes"] == len(b.nx)
    assert st["edges"] == b.nx.number_of_edges()
    assert st["colours"] == {FORWARD_COLOR: n_fwd, BACKWARD_COLOR: n_grad, SAVED_COLOR: n_saved}
    # ... and counted from the layers and gate rules (LENET_NODES, LENET_BACKWARD above)
    assert (st["nodes"], st["edges"]) == (LENET_NODES + LENET_BWD_NODES,
                                          LENET_EDGES + LENET_GRAD_EDGES + LENET_SAVED_EDGES)
    assert (n_fwd, n_grad, n_saved) == (LENET_EDGES, LENET_GRAD_EDGES, LENET_SAVED_EDGES)
    # every red edge carries its rule, and the rule is the graph's
    red = [e for e in edge_lines(src) if f'color="{BACKWARD_COLOR}"' in e]
    assert len(red) == LENET_GRAD_EDGES and all("label=" in e for e in red)
    assert set(st["edge_labels"]) >= LENET_RULES
    rules = {(u, v): d["rule"] for u, v, d in b.nx.edges(data=True)}
    for e in red:       # mirror layout: drawn head -> tail with dir=back
        m = re.match(r'("?[^"\s]+"?) -> ("?[^"\s]+"?) \[label="?([^"\s]+)', e)
        head, tail, label = m.group(1).strip('"'), m.group(2).strip('"'), m.group(3)
        assert "dir=back" in e and rules[(tail, head)] == label
    # the mirror: each param ranked with its gradient output, the loss with the seed
    has_grad = {d.get("grad_of") for _, d in b.nx.nodes(data=True)} | {b.loss}
    assert src.count("rank=same") == len(has_grad & set(lenet.nx)) == LENET_NODES - 2   # all but x, labels
    for p in lenet.param_names:
        assert re.search(r'rank=same\s+"?%s"?\s+"grad/%s"' % (re.escape(p), re.escape(p)), src)
    assert "rankdir=TB" in src


def test_copy_add_rule_is_drawn():
    g = gc.models.load("resnet_block")
    b = grad(g, wrt=g.param_names + ["x"])          # x feeds the block and its projection: a fan-out
    src = gc.render(b, compact=False)
    assert "copy:add" in dot_stats(src)["edge_labels"]
    assert "x.copy" in node_labels(src)


def test_layouts(lenet):
    sep = gc.render(lenet, backward=True, layout="separate")
    assert "cluster_role_forward" in sep and "cluster_role_backward" in sep
    assert "rank=same" not in sep and "dir=back" not in sep
    only = gc.render(lenet, layout="backward-only", compact=False)
    st = dot_stats(only)
    assert FORWARD_COLOR not in st["colours"]                # no forward edges
    assert st["colours"][BACKWARD_COLOR] == LENET_GRAD_EDGES
    assert "graphc-ghost" in only                            # forward values read, drawn as ghosts
    with pytest.raises(GraphError, match="layout"):
        gc.render(lenet, backward=True, layout="sideways")


def test_rankdir_defaults_and_override():
    seed = gc.models.load("seed_cnn")
    assert "rankdir=LR" in gc.render(seed)                   # short graph: left to right, as the slides
    assert "rankdir=TB" in gc.render(seed, rankdir="TB")
    with pytest.raises(GraphError, match="rankdir"):
        gc.render(seed, rankdir="diagonal")


def test_collapse_keeps_vgg16_backward_readable():
    vgg = gc.models.load("vgg16")
    full = dot_stats(gc.render(vgg, backward=True, compact=False))
    src = gc.render(vgg, backward=True, collapse=True)
    st = dot_stats(src)
    assert full["nodes"] > 200 and st["nodes"] <= 40
    labels = node_labels(src)
    assert "conv3_[1-3] x3" in labels and "d conv3_[1-3] x3" in labels
    assert "conv1_[1-2] x2" in labels and "d conv5_[1-3] x3" in labels
    assert "1,475,328 params" in labels["conv3_[1-3] x3"]   # 3 x (3*3*C*256 + 256) with C = 128, 256, 256
    assert 'rank=same\n\t\t"conv3_[1-3] x3"\n\t\t"d conv3_[1-3] x3"' in src
    assert set(st["colours"]) == {FORWARD_COLOR, BACKWARD_COLOR}   # no dashed web when collapsed
    assert vgg.params.shape("conv1_1.w") is None             # 138M weights never materialised


def test_collapse_alexnet_merges_conv3_to_5():
    src = gc.render(gc.models.load("alexnet"), collapse=True)
    assert "conv[3-5] x3" in node_labels(src)


# ------------------------------------------------------------------------------------------ fused groups

def fuse_by_hand(g, names, pattern):
    """Replaces the chain `names` by one node in graphc.ops.fused's format (pattern/body/results),
    named like its last member, as the fusion pass does."""
    g = g.clone()
    G = g.nx
    index = {n: j for j, n in enumerate(names)}
    body, outer = [], []
    for n in names:
        d = G.nodes[n]
        ins = []
        for i in d["inputs"]:
            if i in index:
                ins.append(("body", index[i]))
            else:
                if i not in outer:
                    outer.append(i)
                ins.append(("in", outer.index(i)))
        body.append(dict(name=n, op=d["op"], inputs=ins, attrs=dict(d["attrs"]), shape=d["shape"],
                         dtype=d["dtype"]))
    last = names[-1]
    for n in names[:-1]:
        G.remove_node(n)
    for u in list(G.predecessors(last)):
        G.remove_edge(u, last)
    for i in outer:
        G.add_edge(i, last, rule=None)
    G.nodes[last].update(op="fused", inputs=tuple(outer), attrs=dict(
        pattern=pattern, body=body, results=(len(body) - 1,),
        in_types=tuple((G.nodes[i]["shape"], G.nodes[i]["dtype"]) for i in outer), replaces=tuple(names)))
    return g


def test_fused_node_is_a_cluster_of_its_body(lenet):
    f = fuse_by_hand(lenet, ["c1", "c1.relu", "s2"], "conv_relu_maxpool")
    f = fuse_by_hand(f, ["c3", "c3.relu", "s4"], "conv_relu_maxpool")
    src = gc.render(f)
    st = dot_stats(src)
    assert st["clusters"] == 2
    assert src.count('label="kernel conv_relu_maxpool') == 2
    labels = node_labels(src)
    for n in ("c1", "c1.relu", "s2", "c3", "c3.relu", "s4"):          # body nodes keep their names
        assert any(lab.startswith(f"{n}: ") for lab in labels.values())
    # same values and edges as the unfused graph (x, c1.w, c1.b enter the cluster)
    assert (st["nodes"], st["edges"]) == (LENET_NODES, LENET_EDGES)
    assert 'x -> "s2#c1"' in src and '"s2#s2" -> "s4#c3"' in src
    # fused=False draws each fused node as one box
    flat = dot_stats(gc.render(f, fused=False))
    assert flat["clusters"] == 0 and flat["nodes"] == LENET_NODES - 2 * (3 - 1)   # 3 nodes -> 1 box, twice


def test_fused_values_are_shown_inside_the_cluster(lenet):
    f = fuse_by_hand(lenet, ["c1", "c1.relu", "s2"], "conv_relu_maxpool")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 1, 28, 28)), "labels": np.array([3])}
    src = gc.render(f, values=feeds)
    labels = node_labels(src)
    assert "= min 0 mean" in labels["s2#c1.relu"]                      # a relu: nothing below 0


def test_real_fusion_pass_gives_clusters(lenet):
    src = gc.render(lenet, fused=True)
    st = dot_stats(src)
    assert st["clusters"] >= 2 and "conv_relu_maxpool" in src
    both = gc.render(lenet, fused=True, backward=True)
    assert dot_stats(both)["clusters"] > st["clusters"]          # backward kernels too


# ------------------------------------------------------------------------------------------ values

def test_seed_cnn_trace_shows_the_worked_example():
    src = gc.render(gc.models.load("seed_cnn"), backward=True, values=SEED_FEEDS)
    labels = node_labels(src)
    # forward values (the course notes): C, h, logits, softmax O
    assert "[[1.9, 0.3], [0.3, 1.9]]" in labels["C"]
    assert "[1.3, 3.06]" in labels["h"]
    assert "[1.042, 1.914]" in labels["logits"]
    o = numbers(labels["loss"].split("O = softmax = ")[1])
    assert np.allclose(o, [0.295, 0.705], atol=6e-4)                  # shown: 0.2948, 0.7052
    # gradients: dL/dlogits = O - y, dL/dh, dL/dC, dL/dF, dL/db1
    assert "[-0.7052, 0.7052]" in labels["softmax_ce_grad1"]
    assert "[0.141, 0.141]" in labels["matmul1"]
    assert "[0.0846, 0.1128, 0.141, 0.1692]" in labels["matmul3"]
    # the grad/<param> identities are elided: their producers are the outputs, titled dL/d<param>
    assert "grad/conv.w" not in labels and labels["conv_dw1"].startswith("dL/dconv.w\\nconv_dw")
    df = numbers(labels["conv_dw1"].split("= ")[1])
    assert len(df) == 4 and np.allclose(df, 0.2538, atol=1.5e-4)    # exact 0.25386, shown 0.2539
    db = numbers(labels["sum1"].split("= ")[1])
    assert np.allclose(db, 0.5076, atol=1.5e-4)                      # exact 0.50772, shown 0.5077
    # the gradient edges carry the same numbers (a matrix one row per line)
    assert 'label="conv:dW\\n[[0.0846, 0.1128],\\n [0.141, 0.1692]]"' in src
    plain = gc.render(gc.models.load("seed_cnn"), backward=True, values=SEED_FEEDS, compact=False)
    assert 'label="grad\\n[[0.2539, 0.2539],\\n [0.2539, 0.2539]]"' in plain
    for shown in ("0.2539", "0.2948", "0.7052", "0.5077"):
        assert shown in src


def test_fmt_number():
    f = rendering.fmt_number
    assert [f(0.253858), f(0.0846193), f(-0.705162), f(1.91400001), f(3.06), f(0.0)] == \
        ["0.2539", "0.0846", "-0.7052", "1.914", "3.06", "0"]
    assert f(1.5e-6) == "1.5e-06" and f(123456.0) == "1.23e+05"
    assert rendering.fmt_value(np.zeros((1000,))) == "min 0 mean 0 max 0"


# ------------------------------------------------------------------------------------------ files

@needs_engine
@pytest.mark.parametrize("ext, magic", [("svg", b"<?xml"), ("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF-")])
def test_real_files(tmp_path, lenet, ext, magic):
    path = tmp_path / f"lenet.{ext}"
    src = gc.render(lenet, path, backward=True)
    data = path.read_bytes()
    assert data.startswith(magic) and len(data) > 1000
    assert src.startswith("digraph")
    if ext == "svg":
        text = data.decode()
        assert "<svg" in text and "conv:dX&#45;fullconv" in text and BACKWARD_COLOR in text


@needs_engine
def test_format_argument_overrides_extension(tmp_path):
    path = tmp_path / "picture.out"
    gc.render(gc.models.load("seed_cnn"), path, format="png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_dot_file_and_bad_format(tmp_path):
    g = gc.models.load("seed_cnn")
    src = gc.render(g, tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text() == src
    with pytest.raises(GraphError, match="cannot tell the output format.*svg, png, pdf, dot, json"):
        gc.render(g, tmp_path / "g.bmp")
    with pytest.raises(GraphError, match="does not exist"):
        gc.render(g, tmp_path / "missing" / "g.svg")


def test_json_round_trips_through_networkx(tmp_path):
    g = gc.models.load("seed_cnn")
    path = tmp_path / "seed.json"
    gc.render(g, path, backward=True, values=SEED_FEEDS)
    data = json.loads(path.read_text())
    G = nx.node_link_graph(data, edges="links")
    b = grad(g, keep_outputs=True)
    assert set(G.nodes) == set(b.nx.nodes) and set(G.edges) == set(b.nx.edges)
    d = G.nodes["conv_dw1"]
    assert d["op"] == "conv_dw" and d["rule"] == "conv:dW" and d["grad_of"] == "conv.w"
    assert d["attrs"]["stride"] == [1, 1] and d["shape"] == [1, 1, 2, 2]
    assert np.allclose(d["value"], 0.253858, atol=1e-6)
    assert G.edges["mul2", "conv_dw1"]["rule"] == "conv:dW"
    assert G.graph["loss"] == "loss" and "grad/conv.w" in G.graph["outputs"]
    # -inf pads (Inception's max pool) and arrays are JSON-safe
    inc = tmp_path / "inc.json"
    gc.render(gc.models.load("inception_block"), inc)
    json.loads(inc.read_text())
    assert "-inf" in inc.read_text()


def test_missing_layout_engine_writes_dot_and_says_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygraphviz", None)          # import pygraphviz -> ImportError
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert rendering._engine() is None
    target = tmp_path / "lenet.svg"
    with pytest.raises(GraphError) as err:
        gc.render(gc.models.load("lenet5"), target)
    msg = str(err.value)
    assert "pip install pygraphviz" in msg and "apt-get install graphviz" in msg
    assert str(tmp_path / "lenet.dot") in msg
    assert not target.exists()
    assert (tmp_path / "lenet.dot").read_text().startswith("digraph")
    # formats that need no layout still work
    gc.render(gc.models.load("lenet5"), tmp_path / "ok.json")
    assert (tmp_path / "ok.json").exists()


def test_render_rejects_non_graphs():
    with pytest.raises(GraphError, match="graphc.Graph"):
        gc.render("lenet5")
