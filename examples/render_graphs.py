"""Render the course's pictures with graphc: the worked seed CNN forward and backward with every value
and gradient written on it (the slides' step-by-step trace, generated), and LeNet-5 after fusion
(each fused kernel a cluster of the gates it replaced).

    python examples/render_graphs.py            # writes into ./renders
    python examples/render_graphs.py out/       # or into out/

Needs a Graphviz layout engine: pygraphviz (installed with graphc; renders in-process) or the `dot`
program. The same pictures from the command line:

    graphc render seed_cnn --values -o renders/seed_cnn_forward.svg
    graphc render seed_cnn --backward --values -o renders/seed_cnn_backward.svg
    graphc render lenet5 --fused -o renders/lenet5_fused.svg
"""
import os
import sys

import graphc as gc
from graphc.models import SEED_LABELS, SEED_X


def main(out_dir="renders"):
    os.makedirs(out_dir, exist_ok=True)
    feeds = {"x": SEED_X, "labels": SEED_LABELS}
    seed = gc.models.load("seed_cnn")
    written = []

    path = os.path.join(out_dir, "seed_cnn_forward.svg")
    gc.render(seed, path, values=feeds)
    written.append((path, "seed_cnn forward, every value written on its node"))

    path = os.path.join(out_dir, "seed_cnn_backward.svg")
    gc.render(seed, path, backward=True, values=feeds)
    written.append((path, "seed_cnn forward + backward mirrored: gradients on the red edges, "
                          "dL/dF = 0.2539 each, dL/db1 = 0.5077, O = [0.2948, 0.7052]"))

    path = os.path.join(out_dir, "seed_cnn_backward.png")
    gc.render(seed, path, backward=True, values=feeds)
    written.append((path, "the same as PNG"))

    lenet = gc.models.load("lenet5")
    path = os.path.join(out_dir, "lenet5_fused.svg")
    gc.render(lenet, path, fused=True)
    written.append((path, "LeNet-5 after the numba pipeline's passes: each fused kernel is a cluster"))
    path = os.path.join(out_dir, "lenet5_fused_backward.svg")
    gc.render(lenet, path, fused=True, backward=True)
    written.append((path, "LeNet-5 forward + backward fused: conv_relu_maxpool forward saves its route, "
                          "route_relu backward"))

    path = os.path.join(out_dir, "vgg16_backward_collapsed.svg")
    gc.render(gc.models.load("vgg16"), path, backward=True, collapse=True)
    written.append((path, "VGG16 forward + backward, repeated blocks collapsed (conv3_[1-3] x3)"))

    for path, what in written:
        print(f"{path}: {what}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "renders")
