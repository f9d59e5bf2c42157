"""Readable pictures: compact backward graphs (identity nodes elided with their rule on the edge, scalar
constants written into their readers, gradients titled dL/d<value>), the legend, tooltips with whole
arrays, --dpi, top-to-bottom by default, Jupyter display, untangled separate/backward-only layouts,
collapsed fused graphs without internals, trained values on a real digit, and the README's headline
picture readable at 1000 px."""
import io
import re
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

import graphc as gc
from graphc import cli, rendering
from graphc.passes.transforms.autodiff import grad
from graphc.render_values import example_feeds, value_feeds
from graphc.rendering import BACKWARD_COLOR, dot_stats
from test_render import node_labels

ROOT = Path(__file__).resolve().parents[1]
SEED_FEEDS = {"x": gc.models.SEED_X, "labels": gc.models.SEED_LABELS}


def needs_engine():
    pytest.importorskip("pygraphviz")


@pytest.fixture(scope="module")
def lenet():
    return gc.models.load("lenet5")


def test_compact_backward_elides_identities_and_inlines_scalars(lenet):
    b = grad(lenet, keep_outputs=True)
    src = gc.render(lenet, backward=True)
    labels = node_labels(src)
    identities = [n for n, d in b.nx.nodes(data=True) if d["op"] == "identity"]
    scalars = [n for n, d in b.nx.nodes(data=True) if d["op"] == "const" and d["shape"] == ()]
    assert identities and scalars
    assert not set(identities) & set(labels) and not set(scalars) & set(labels)
    assert dot_stats(src)["nodes"] == len(b.nx) - len(identities) - len(scalars)
    # every red edge still names its rule; an elided identity's rule stays on the edge that replaces it
    red = [line for line in src.splitlines() if f'color="{BACKWARD_COLOR}"' in line and "->" in line]
    assert red and all("label=" in e for e in red)
    assert any("add:distribute \u2192 matmul:swap" in e for e in red)
    # gradients are titled dL/d<value>; automatic names (mul4, gt3) are only in the tooltips
    for n, d in b.nx.nodes(data=True):
        if n in labels and d.get("role") == "backward":
            first = labels[n].split("\\n")[0]
            assert first.startswith("dL/d") or first.startswith(d["op"]), (n, first)
            assert not re.search(rf"\b{re.escape(n)}\b", labels[n]), (n, labels[n])
    assert any(lab.startswith("gt(\u00b7, 0)") for lab in labels.values())     # relu's mask: x > 0
    # the gradient outputs' double border moved onto the ops that make them, ranked with their params
    for p in lenet.param_names:
        maker = b.nx.nodes[f"grad/{p}"]["inputs"][0]
        assert re.search(rf'^\s*"?{re.escape(maker)}"? \[.*peripheries=2', src, re.M), p
        assert re.search(r'rank=same\s+"?%s"?\s+"?%s"?' % (re.escape(p), re.escape(maker)), src)


def test_legend_title_and_default_directions(lenet):
    seed = gc.models.load("seed_cnn")
    src = gc.render(seed, backward=True, values=SEED_FEEDS)
    assert "rankdir=TB" in src                                       # backward or values: top to bottom
    assert "rankdir=TB" in gc.render(seed, values=SEED_FEEDS) and "rankdir=LR" in gc.render(seed)
    assert "output (double border)" in src and "gradient dL/d" in src and "labelled with its gate rule" in src
    assert "hover: the whole array" in src and "seed_cnn: forward and backward, with values" in src
    plain = gc.render(seed, legend=False)
    assert "double border" not in plain and "seed_cnn: forward" in plain
    fused = gc.render(lenet, fused=True)
    assert "fused kernel (dashed frame)" in fused and "gradient" not in fused.split("rankdir")[0]


def test_rendering_is_the_dot_string_and_displays_in_jupyter(lenet):
    needs_engine()
    r = gc.render(lenet)
    assert isinstance(r, str) and r.startswith("digraph") and r.source == str(r)
    svg = r._repr_svg_()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert r.png().startswith(b"\x89PNG")


def test_tooltips_hold_whole_arrays(lenet, tmp_path):
    needs_engine()
    path = tmp_path / "v.svg"
    feeds = example_feeds(lenet)
    gc.render(lenet, path, values=feeds)
    svg = path.read_text()
    tip = re.search(r'xlink:title="(c1\.w: param \(6, 1, 5, 5\)[^"]*)"', svg).group(1)
    assert tip.count("&#10;") >= 25 and tip.count("[") >= 30       # all 150 weights, one row a line
    label = node_labels(gc.render(lenet, values=feeds))["c1.w"]
    assert "min " in label and "mean " in label                     # the label itself stays short


def test_dpi(tmp_path):
    needs_engine()
    Image = pytest.importorskip("PIL.Image")
    seed = gc.models.load("seed_cnn")
    gc.render(seed, tmp_path / "a.png")
    gc.render(seed, tmp_path / "b.png", dpi=48)
    a, b = Image.open(tmp_path / "a.png").size, Image.open(tmp_path / "b.png").size
    assert abs(b[0] / a[0] - 0.5) < 0.02                            # Graphviz's default is 96 dpi


def test_separate_and_backward_only_are_untangled(lenet):
    src = gc.render(lenet, backward=True, layout="separate")
    forward = set(lenet.nx)
    body = src.split("subgraph cluster_role_backward")[1]
    for line in src.splitlines():                   # no edge from the forward part into the backward one
        m = re.match(r'\s*("?[^"\s]+"?) -> ("?[^"\s]+"?)', line)
        if m and m.group(1).strip('"') in forward:
            assert m.group(2).strip('"') in forward, line
    ghosts = re.findall(r'"([^"]+@[^"]+)" \[label', body)
    assert ghosts and all(g.split("@")[0] in forward for g in ghosts)
    only = gc.render(lenet, layout="backward-only")
    labels = node_labels(only)
    assert not forward & set(labels) and all("@" in n or n not in forward for n in labels)
    assert "constraint=false" not in "".join(line for line in only.splitlines() if "@" in line)


def test_collapsed_fused_graphs_show_no_internals(capsys, tmp_path):
    src = gc.render(gc.models.load("mnist_convnet"), backward=True, collapse=True, fused=True)
    labels = node_labels(src)
    text = " ".join(labels) + " " + " ".join(labels.values())
    assert "getitem" not in text and "+fused" not in text and "fused+" not in text and ":pool" not in text
    assert "conv[1-2] x2" in labels and "(fused)" in labels["conv[1-2] x2"]
    assert "conv:dX-fullconv" in dot_stats(src)["edge_labels"]
    vgg = node_labels(gc.render(gc.models.load("vgg16"), backward=True, collapse=True))
    assert "(N, 64, 224, 224)" in vgg["d conv1_1"]                  # dL/d(conv1_1), not the bias's (64,)
    # the CLI says "fused kernels" only when kernels were fused
    assert cli.main(["render", "lenet5", "--layout", "separate", "--format", "dot", "-o", str(tmp_path / "s.dot")]) == 0
    assert "fused kernel" not in capsys.readouterr().out
    assert cli.main(["render", "lenet5", "--fused", "--format", "dot", "-o", str(tmp_path / "f.dot")]) == 0
    assert re.search(r"\d+ fused kernels", capsys.readouterr().out)


def test_values_use_a_real_digit_and_trained_weights(tmp_path, capsys):
    ds = gc.data.load_mnist5k()
    feeds = example_feeds(gc.models.load("lenet5"))
    np.testing.assert_allclose(feeds["x"][0, 0], ds.x_test[0] / 255.0)
    assert feeds["labels"].tolist() == [int(ds.y_test[0])]
    pytest.importorskip("PIL")
    from PIL import Image
    tiny = gc.data.Dataset(ds.x_train[:128], ds.y_train[:128], ds.x_test[:32], ds.y_test[:32], "mnist5k-tiny")
    ck = tmp_path / "run.npz"
    r = gc.train.train("lenet5", data=tiny, epochs=1, backend="reference", save=ck, progress=False, log=None)
    Image.fromarray(ds.x_test[5]).save(tmp_path / "digit.png")
    g, feeds, about = value_feeds(gc.models.load("lenet5"), "lenet5", checkpoint=ck, image=tmp_path / "digit.png")
    np.testing.assert_array_equal(g.params["c1.w"], r.exe.state["c1.w"])
    np.testing.assert_allclose(feeds["x"], ds.x_test[5][None, None] / 255.0, rtol=1e-6)
    predicted = int(gc.infer.predict(r, ds.x_test[5])[0][0])
    assert feeds["labels"].tolist() == [predicted] and f"label {predicted} (the predicted class)" in about
    out = tmp_path / "trained.dot"
    assert cli.main(["render", "lenet5", "--values", "--checkpoint", str(ck), "--image", str(tmp_path / "digit.png"),
                     "--format", "dot", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"image {tmp_path / 'digit.png'}, the trained weights of {ck}" in printed
    logits = gc.load(ck).run({"x": feeds["x"].astype(np.float32)})["logits"][0]
    shown = node_labels(out.read_text())["logits"]
    assert f"{logits[0]:.3g}"[:4] in shown.replace("\\n", " ")


def svg_size_and_fonts(svg):
    w, h = [float(v) for v in re.search(r'viewBox="0\.00 0\.00 ([\d.]+) ([\d.]+)"', svg).groups()]
    fonts = [float(x) for x in re.findall(r'font-size="([\d.]+)"', svg)]
    return w, h, fonts


def test_headline_picture_is_readable_at_page_width(tmp_path, capsys):
    needs_engine()
    Image = pytest.importorskip("PIL.Image")
    readme = (ROOT / "README.md").read_text()
    cmd = re.search(r"`(graphc render seed_cnn --backward --values -o examples/seed_cnn_backward\.svg)`",
                    readme).group(1)
    fresh = tmp_path / "headline.svg"
    assert cli.main(cmd.split()[1:-1] + [str(fresh)]) == 0
    committed = (ROOT / "examples" / "seed_cnn_backward.svg").read_text()
    assert svg_size_and_fonts(committed)[:2] == svg_size_and_fonts(fresh.read_text())[:2]   # regenerated
    w, h, fonts = svg_size_and_fonts(fresh.read_text())
    assert max(w / h, h / w) <= 2.0                                # at most 2:1 either way
    scale = 1000 / w                                               # pixels per point at 1000 px wide
    assert min(fonts) * scale >= 9.0                               # the smallest text is at least 9 px
    png = Image.open(ROOT / "examples" / "seed_cnn_backward.png")  # the 1000 px rendering, as committed
    assert png.size[0] == 1000 and max(png.size) / min(png.size) <= 2.0
    assert abs(png.size[1] - round(1000 * h / w)) <= 3
