"""Optional comparison: the same models trained in graphc and in PyTorch, like for like.

    pip install torch            # optional; graphc itself never imports torch
    python examples/torch_compare.py --models lenet5 mnist_convnet --epochs 5 --optimizer adam --batch 128

Like for like: the same 4,000 / 1,000 split (graphc.data), the same initial weights (PyTorch's are
copied from graphc's initial parameters for each seed, so the initialisation scheme is identical), the
same optimizer and hyper-parameters (Adam lr 1e-3, betas 0.9/0.999, eps 1e-8; SGD; SGD momentum 0.9),
the same batch size, epochs and batch order (graphc.data.batches(seed, epoch)), the same dropout rate
(the masks themselves are drawn by each framework's own generator, or with --dropout-masks graphc
PyTorch uses graphc's very masks). Before training, the loss of the
first batch is computed by both from the same weights as a check that the two models are the same.

Reports the test accuracy of each seed, the mean over the seeds, graphc minus PyTorch in points,
and the training time per epoch (evaluation excluded) of each, on this machine.

Measured (2-core machine, torch 2.13.0+cpu, mnist5k, adam lr 1e-3, batch 128, 5 epochs, seeds 0 1 2):

    model          graphc                    PyTorch   graphc - PyTorch   backend / dropout masks
    lenet5         0.9453 (.950 .945 .941)   0.9483    -0.30 points       reference
    lenet5         0.9470 (.950 .949 .942)   0.9483    -0.13 points       numba
    mnist_convnet  0.9477 (.941 .950 .952)   0.9503    -0.27 points       reference, own masks
    mnist_convnet  0.9473 (.941 .949 .952)   0.9503    -0.30 points       numba, own masks
    mnist_convnet  0.9473 (.941 .949 .952)   0.9473    +0.00 points       numba, --dropout-masks graphc
                                                                          (every seed identical)

Time per epoch (training only, epochs 2-5): graphc reference ~5.7 s (lenet5) and ~28 s (mnist_convnet);
graphc numba 0.4-0.7 s and 1.4 s; PyTorch's fastest epochs 0.2 s and 0.8-0.9 s. These timings were
taken while other jobs kept the load average at 4-14 on the 2 CPUs, so they are noisy (PyTorch's two
OpenMP threads suffered most: its medians were 2.5 s and 6.2 s); rerun on a quiet machine for clean ones.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from graphc import data as gdata
from graphc import models as gmodels
from graphc.compiler import BACKENDS
from graphc.train import DEFAULT_LR, OPTIMIZERS, train

try:
    import torch
    import torch.nn.functional as F
except ImportError:         # pragma: no cover - a clear message instead of a traceback
    sys.exit("torch_compare.py needs PyTorch: pip install torch")


# --------------------------------------------------------------------------- the models in PyTorch
# Parameters are kept under graphc's names (with "." -> "__") so weights copy one to one:
# conv weights (K, C, KH, KW) and dense weights (out, in) have the same layout in both.

class Net(torch.nn.Module):
    def __init__(self, graph, forward, graphc_masks=False):
        super().__init__()
        self.seed, self.step, self.graphc_masks = graph.seed, 0, graphc_masks
        self.p = torch.nn.ParameterDict({
            n.replace(".", "__"): torch.nn.Parameter(torch.tensor(np.asarray(graph.params[n]), dtype=torch.float32))
            for n in graph.param_names})
        self._forward = forward

    def w(self, name):
        return self.p[name.replace(".", "__")]

    def forward(self, x):
        return self._forward(self, x)


def _mlp(m, x):
    h = x.flatten(1)
    h = F.relu(F.linear(h, m.w("fc1.w"), m.w("fc1.b")))
    h = F.relu(F.linear(h, m.w("fc2.w"), m.w("fc2.b")))
    return F.linear(h, m.w("logits.w"), m.w("logits.b"))


def _lenet5(m, x):
    h = F.max_pool2d(F.relu(F.conv2d(x, m.w("c1.w"), m.w("c1.b"), padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, m.w("c3.w"), m.w("c3.b"))), 2)
    h = h.flatten(1)
    h = F.relu(F.linear(h, m.w("f5.w"), m.w("f5.b")))
    h = F.relu(F.linear(h, m.w("f6.w"), m.w("f6.b")))
    return F.linear(h, m.w("logits.w"), m.w("logits.b"))


def _dropout(m, h, rate):
    """Inverted dropout at graphc's rate. With m.graphc_masks, the very masks graphc draws
    (numpy default_rng([graph seed, step]), keep where u >= rate, scaled 1/(1-rate)); else torch's own."""
    if not m.training or rate == 0.0:
        return h
    if not m.graphc_masks:
        return F.dropout(h, rate, training=True)
    u = np.random.default_rng([m.seed, m.step]).random(tuple(h.shape))
    mask = torch.from_numpy(((u >= rate) / (1.0 - rate)).astype(np.float32))
    return h * mask


def _mnist_convnet(m, x, rate=0.5):
    h = F.max_pool2d(F.relu(F.conv2d(x, m.w("conv1.w"), m.w("conv1.b"))), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, m.w("conv2.w"), m.w("conv2.b"))), 2)
    h = _dropout(m, h.flatten(1), rate)                          # Keras Dropout(0.5), as graphc's
    return F.linear(h, m.w("logits.w"), m.w("logits.b"))


TORCH_MODELS = {"mlp": _mlp, "lenet5": _lenet5, "mnist_convnet": _mnist_convnet}


def torch_optimizer(name, params, lr):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    # torch's momentum form (v = m v + g; w -= lr v) equals graphc's (v = m v - lr g; w += v) at fixed lr
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0)


def train_torch(model, ds, epochs, batch, optimizer, lr, seed, graphc_masks=False):
    torch.manual_seed(seed)
    graph = gmodels.load(model, seed=seed)
    net = Net(graph, TORCH_MODELS[model], graphc_masks)
    opt = torch_optimizer(optimizer, net.parameters(), lr)
    xtr, ytr = gdata.normalize(ds.x_train), ds.y_train
    xte, yte = torch.from_numpy(gdata.normalize(ds.x_test)), torch.from_numpy(ds.y_test)
    secs, accs = [], []
    for epoch in range(epochs):
        net.train()
        t0 = time.perf_counter()
        for xb, yb in gdata.batches(xtr, ytr, batch, shuffle=True, seed=seed, epoch=epoch):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(torch.from_numpy(xb)), torch.from_numpy(yb))
            loss.backward()
            opt.step()
            net.step += 1
        secs.append(time.perf_counter() - t0)
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(xte[i:i + 500]).argmax(1) for i in range(0, len(xte), 500)])
        accs.append(float((pred == yte).float().mean()))
    return accs[-1], secs


def first_batch_losses(model, ds, batch, seed):
    """Loss of the first training batch from the initial weights, in graphc and in PyTorch (no dropout)."""
    import graphc as gc
    graph = gmodels.load(model, seed=seed)
    xb, yb = next(gdata.batches(gdata.normalize(ds.x_train), ds.y_train, batch, seed=seed, epoch=0))
    exe = gc.compile(graph, backend="reference")
    ours = float(exe.run({"x": xb, "labels": yb})[graph.outputs[0]])
    ours_train = float(exe.run({"x": xb, "labels": yb}, training=True)[graph.outputs[0]])   # step 0's masks
    net = Net(graph, TORCH_MODELS[model], graphc_masks=True).eval()
    with torch.no_grad():
        theirs = float(F.cross_entropy(net(torch.from_numpy(xb)), torch.from_numpy(yb)))
        net.train()
        theirs_train = float(F.cross_entropy(net(torch.from_numpy(xb)), torch.from_numpy(yb)))
    return ours, theirs, ours_train, theirs_train


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lenet5", "mnist_convnet"], choices=sorted(TORCH_MODELS))
    p.add_argument("--data", default="mnist5k", help="mnist5k (default) or mnist:DIR")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--lr", type=float, default=None, help="default: adam 1e-3, sgd 0.1, momentum 0.01")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backend", choices=BACKENDS, default="numba", help="graphc backend (default numba)")
    p.add_argument("--dropout-masks", choices=("own", "graphc"), default="own",
                   help="own (default): each framework draws its own dropout masks at the same rate; graphc: "
                        "PyTorch uses the very masks graphc draws, which takes the dropout noise out of the "
                        "comparison (what is left is floating-point rounding)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = gdata.load_dataset(args.data)
    print(f"data {ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test; {args.optimizer} lr {lr:g}, "
          f"batch {args.batch}, {args.epochs} epochs, seeds {args.seeds}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); dropout masks: {args.dropout_masks}")
    report = {"config": vars(args) | {"lr": lr}, "models": {}}
    for model in args.models:
        ours, theirs, ours_tr, theirs_tr = first_batch_losses(model, ds, args.batch, args.seeds[0])
        print(f"\n{model}: first-batch loss from the same initial weights: graphc {ours:.6f}, "
              f"PyTorch {theirs:.6f} (difference {abs(ours - theirs):.1e}); in training mode with graphc's "
              f"dropout masks: {ours_tr:.6f} vs {theirs_tr:.6f}")
        g_acc, t_acc, g_secs, t_secs, backend = [], [], [], [], None
        for seed in args.seeds:
            r = train(model, data=ds, epochs=args.epochs, batch=args.batch, optimizer=args.optimizer, lr=lr,
                      backend=args.backend, seed=seed, progress=False, log=None)
            backend = r.backend
            g_acc.append(r.final_test_accuracy)
            g_secs.append(r.epoch_seconds)
            acc, secs = train_torch(model, ds, args.epochs, args.batch, args.optimizer, lr, seed,
                                    graphc_masks=args.dropout_masks == "graphc")
            t_acc.append(acc)
            t_secs.append(secs)
            print(f"  seed {seed}: graphc ({backend}) {r.final_test_accuracy:.4f} "
                  f"[s/epoch {' '.join(f'{s:.1f}' for s in r.epoch_seconds)}]   "
                  f"PyTorch {acc:.4f} [s/epoch {' '.join(f'{s:.1f}' for s in secs)}]", flush=True)
        gm, tm = float(np.mean(g_acc)), float(np.mean(t_acc))
        g_flat = [s for run in g_secs for s in (run[1:] or run)]
        t_flat = [s for run in t_secs for s in (run[1:] or run)]
        g_first = float(np.mean([run[0] for run in g_secs]))
        t_first = float(np.mean([run[0] for run in t_secs]))
        print(f"  mean test accuracy over {len(args.seeds)} seeds: graphc {gm:.4f}, PyTorch {tm:.4f}, "
              f"graphc - PyTorch = {100 * (gm - tm):+.2f} points "
              f"({'within' if abs(gm - tm) <= 0.005 else 'NOT within'} 0.5 points)")
        print(f"  training time per epoch, median of epochs 2..{args.epochs} [fastest epoch; mean first epoch]: "
              f"graphc {backend} {statistics.median(g_flat):.2f} s [{min(g_flat):.2f} s; {g_first:.2f} s], "
              f"PyTorch {statistics.median(t_flat):.2f} s [{min(t_flat):.2f} s; {t_first:.2f} s]")
        load = _loadavg()
        if load is not None and load > (os.cpu_count() or 1):
            print(f"  note: load average {load:.1f} on {os.cpu_count()} CPUs: other processes share this machine, "
                  "so the timings are noisy; the fastest epoch is the least disturbed figure")
        report["models"][model] = {"backend": backend, "graphc_accuracy": g_acc, "torch_accuracy": t_acc,
                                   "graphc_mean": gm, "torch_mean": tm, "difference_points": 100 * (gm - tm),
                                   "graphc_epoch_seconds": g_secs, "torch_epoch_seconds": t_secs,
                                   "first_batch_loss": {"graphc": ours, "torch": theirs}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
