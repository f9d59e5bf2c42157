"""The `graphc` command line (also `python -m graphc`): summary, render, bench, train, predict.

    graphc summary lenet5
    graphc render seed_cnn --backward --values -o seed.svg
    graphc bench mnist_convnet --train --batch 128 --compare torch --json out.json
    graphc train lenet5 --epochs 5 --optimizer adam --save run.npz
    graphc predict run.npz digit.png

MODEL is a zoo name (graphc.models.names()) or path/to/file.py:function returning a graphc.Graph.
Every error is one line on stderr (`graphc: error: ...`) and a non-zero exit status; --debug shows the
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from graphc.errors import GraphError

EXIT_ERROR = 1        # a graphc error (bad model, bad file, shape mismatch, ...)
EXIT_USAGE = 2        # bad command-line arguments


class UsageError(Exception):
    """Bad command-line arguments (argparse's complaints, turned into one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        verb = self.prog.removeprefix("graphc").strip()
        raise UsageError(f"{verb + ': ' if verb else ''}{message} (see `{self.prog} --help`)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


MODEL_HELP = ("a zoo model (seed_cnn, mlp, lenet5, mnist_convnet, codelab_cnn, alexnet, vgg16, resnet, "
              "inception, resnet18, mobilenet_v2, googlenet, ...), path/to/file.py:function returning a "
              "graphc.Graph, or model.onnx")


def _zoo_names():
    try:
        from graphc.models import names
        return ", ".join(names())
    except Exception:       # noqa: BLE001 - only for the help text
        return "see graphc.models"


def load_model(spec, **kwargs):
    """graphc.models.load: a user's model file that fails to run is one GraphError line
    ('cannot load model MODEL: <exception>'; --debug shows the traceback), in every verb."""
    from graphc import models
    return models.load(spec, **kwargs)


def _model_basename(spec):
    if ":" in spec and not os.path.exists(spec):
        return spec.rsplit(":", 1)[1]
    return os.path.splitext(os.path.basename(spec))[0]


# ------------------------------------------------------------------------------------------ verbs

def cmd_summary(args):
    from graphc.summarize import summary
    graph = load_model(args.model)
    if args.backward:
        from graphc.passes.transforms.autodiff import grad
        graph = grad(graph, keep_outputs=True)
    print(summary(graph))
    return 0


def cmd_render(args):
    from graphc import rendering
    graph = load_model(args.model)
    layout = "backward-only" if args.backward_only else args.layout
    backward = args.backward or args.backward_only or args.layout == "separate"
    fmt = args.format
    out = args.output
    if out is None:
        suffix = ("_backward_only" if args.backward_only else "_backward" if backward else "") + \
                 ("_fused" if args.fused else "") + ("_collapsed" if args.collapse else "") + \
                 ("_values" if args.values else "")
        out = f"{_model_basename(args.model)}{suffix}.{fmt or 'svg'}"
    values = None
    if args.values or args.checkpoint or args.image:
        from graphc.render_values import value_feeds
        graph, values, about = value_feeds(graph, args.model, checkpoint=args.checkpoint, image=args.image,
                                           label=args.label)
        print(about)
    fused = True if args.fused else None
    if args.dpi is not None and args.dpi <= 0:
        raise GraphError(f"--dpi must be positive, got {args.dpi}")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        picture = rendering.render(graph, out, format=fmt, backward=backward, layout=layout, fused=fused,
                                   values=values, collapse=args.collapse, rankdir=args.rankdir,
                                   max_label=args.max_label, dpi=args.dpi, legend=not args.no_legend)
    st = rendering.dot_stats(picture)
    extra = f", {st['clusters']} fused kernel{'s' if st['clusters'] != 1 else ''}" if st["clusters"] else ""
    print(f"wrote {out} ({st['nodes']} nodes, {st['edges']} edges{extra})")
    return 0


def cmd_bench(args):
    if args.only and not args.suite:
        raise UsageError("bench: --only picks entries of --suite")
    if args.suite or args.table:                  # the fixed benchmark table: graphc/bench_suite.py
        from graphc.bench_suite import main_from_args
        return main_from_args(args)
    if not args.model:
        raise UsageError("bench: give MODEL, or --suite (see `graphc bench --help`)")
    try:
        from graphc.bench import run_bench
    except ImportError as e:
        raise GraphError(f"`graphc bench` is not available in this build (graphc.bench: {e})") from e
    compare = [c.strip() for c in args.compare.split(",") if c.strip()] if args.compare else None
    if args.repeats is not None and args.repeats < 1:
        raise GraphError(f"--repeats must be at least 1, got {args.repeats}")
    if args.ranks:
        from graphc.bench_ranks import run_scaling
        run_scaling(args.model, args.ranks, backend=args.backend, batch=args.batch, train=args.train,
                    json_path=args.json)
        return 0
    more = {k: v for k, v in (("random_weights", args.random_weights), ("timeout", args.timeout)) if v is not None}
    result = run_bench(args.model, backend=args.backend, batch=args.batch, train=args.train,
                       fuse=not args.no_fuse, compare=compare, json_path=args.json, repeats=args.repeats,
                       measure_compile=not args.no_compile_times,
                       fold_bn=not args.no_fold_bn, tune=args.tune, **more)
    return result if isinstance(result, int) else 0


def cmd_predict(args):
    from graphc.predict import main_from_args
    return main_from_args(args)


def cmd_train(args):
    try:
        from graphc import train as train_mod
    except ImportError as e:
        raise GraphError(f"`graphc train` is not available in this build (graphc.train: {e})") from e
    if hasattr(train_mod, "main_from_args"):
        return train_mod.main_from_args(args) or 0
    train_mod.train(model=args.model, data=args.data, epochs=args.epochs, batch=args.batch,
                    optimizer=args.optimizer, lr=args.lr, backend=args.backend, seed=args.seed,
                    save=args.save, resume=args.resume)
    return 0


# ------------------------------------------------------------------------------------------ parser

def _add_train_options(p):
    """graphc.train's own options when it provides them (one definition), else the same set here."""
    try:
        from graphc.train import add_train_arguments
        return add_train_arguments(p)
    except ImportError:
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
        p.add_argument("--data", default=None, metavar="SPEC", help="mnist5k (default, embedded) or mnist:DIR")
        p.add_argument("--epochs", type=int, default=1, metavar="E")
        p.add_argument("--batch", type=int, default=None, metavar="N")
        p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=None)
        p.add_argument("--lr", type=float, default=None, metavar="LR")
        p.add_argument("--backend", choices=("numba", "reference", "cuda"), default="numba")
        p.add_argument("--seed", type=int, default=None, metavar="S")
        p.add_argument("--save", default=None, metavar="CKPT")
        p.add_argument("--resume", default=None, metavar="CKPT")
        return p


def _add_render_parser(sub):
    """`graphc render`'s options."""
    p = sub.add_parser("render", help="draw the forward/backward graph with Graphviz",
                       formatter_class=_Formatter,
                       description="Draw MODEL's graph: forward edges green, gradient edges red and labelled "
                                   "with their gate rule; fused kernels as clusters.",
                       epilog="examples:\n"
                              "  graphc render lenet5                                 # lenet5.svg\n"
                              "  graphc render seed_cnn --backward --values -o seed.png  # the slides' trace\n"
                              "  graphc render lenet5 --backward --fused -o lenet5.pdf\n"
                              "  graphc render vgg16 --backward --collapse            # repeated blocks merged\n"
                              "  graphc render lenet5 --format json -o lenet5.json    # networkx node-link data\n\n"
                              "Layout uses pygraphviz (in-process) or the `dot` program; without either the\n"
                              ".dot file is still written and the error says how to get one.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="output file (default MODEL[_backward][_fused].svg); its extension picks the format")
    p.add_argument("--format", choices=("svg", "png", "pdf", "dot", "json"), default=None,
                   help="output format (default: from FILE's extension, else svg)")
    p.add_argument("--backward", action="store_true",
                   help="draw the backward (gradient) graph mirrored beside the forward one")
    p.add_argument("--backward-only", action="store_true", help="draw the backward graph alone")
    p.add_argument("--layout", choices=("mirror", "separate"), default="mirror",
                   help="with --backward: mirror (gradients ranked with their values, default) or separate "
                        "(two clusters)")
    p.add_argument("--fused", action="store_true",
                   help="run the numba pipeline's passes (fusion) first; fused kernels become clusters")
    p.add_argument("--values", action="store_true",
                   help="write every value and gradient on the graph (seed_cnn: the worked example's feed; "
                        "28x28 digit models: a real test digit of the bundled set; others: a seeded random "
                        "image); full arrays are SVG tooltips")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="with --values: the trained weights of a checkpoint (graphc train --save)")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="with --values: feed this image (.png, .jpg or .npy), preprocessed as the checkpoint records")
    p.add_argument("--label", type=int, default=None, metavar="K",
                   help="with --image: its class (default: the bundled digit's label, else the predicted class)")
    p.add_argument("--dpi", type=float, default=None, metavar="DPI",
                   help="resolution of PNG output (Graphviz's default is 96)")
    p.add_argument("--no-legend", action="store_true", help="leave out the legend of colours and shapes")
    p.add_argument("--collapse", action="store_true",
                   help="merge each layer, and runs of identical layers (conv3_[1-3] x3), into one node")
    p.add_argument("--rankdir", choices=("TB", "LR", "BT", "RL"), default=None,
                   help="rank direction (default TB, top to bottom, when gradients or values are drawn or the "
                        "graph is long; LR for short forward graphs)")
    p.add_argument("--max-label", type=int, default=28, metavar="N", help="longest name shown in a label")
    p.set_defaults(func=cmd_render)


def _add_bench_parser(sub):
    """`graphc bench`'s options."""
    p = sub.add_parser("bench", help="time the compiled kernels and the whole step",
                       formatter_class=_Formatter,
                       description="Benchmark MODEL's compiled kernels (per-kernel table, step time, "
                                   "compile times, roofline) and optionally compare with PyTorch/JAX.",
                       epilog="examples:\n"
                              "  graphc bench lenet5 --train --batch 64 --compare torch\n"
                              "  graphc bench mnist_convnet --train --batch 128 --compare torch --json out.json\n"
                              "  graphc bench mnist_convnet --batch 1            # inference latency\n"
                              "  graphc bench lenet5 --train --no-fuse           # the effect of fusion\n"
                              "  graphc bench lenet5 --train --repeats 50 --no-compile-times   # quick\n"
                              "  graphc bench light_resnet50.onnx --batch 1 --compare onnxruntime,torch\n"
                              "  graphc bench --suite --json suite.json          # the README's table\n"
                              "  graphc bench --suite --only resnet18-train-b16,vgg16-infer-b2\n"
                              "  graphc bench --table suite.json                 # its markdown table again\n"
                              "  graphc bench lenet5 --train --ranks 1,2         # data-parallel scaling (MPI)\n"
                              "  graphc bench resnet18 --batch 1 --no-fold-bn    # the effect of BN folding")
    p.add_argument("model", metavar="MODEL", nargs="?", help=MODEL_HELP)
    p.add_argument("--backend", choices=("numba", "reference", "cuda"), default="numba",
                   help="backend to time (default numba)")
    p.add_argument("--batch", type=int, default=None, metavar="N", help="batch size")
    p.add_argument("--train", action="store_true", help="time a training step (forward+backward+update)")
    p.add_argument("--no-fuse", action="store_true", help="switch the fusion pass off")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="keep inference batch norms apart from their convs (switch the fold_bn pass off)")
    p.add_argument("--compare", default=None, metavar="PEERS",
                   help="comma-separated peers to time in the same run, each in its own process and checked "
                        "to agree with graphc: torch, torch_compile, onnxruntime, jax")
    p.add_argument("--random-weights", type=int, default=None, metavar="SEED",
                   help="an .onnx MODEL's weights replaced by seeded random ones (done with seed 0 by itself "
                        "when its weights are ConstantOfShape placeholders, as in onnx's light/ models)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="cap on each child process (peers, compile probes); default 900 s, 600 in --suite")
    p.add_argument("--suite", action="store_true",
                   help="run the fixed benchmark table (graphc.bench_suite.SUITE) with torch, torch_compile "
                        "and onnxruntime; prints its markdown table, --json writes every result")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="with --suite: the comma-separated entries to run (e.g. resnet18-train-b16)")
    p.add_argument("--table", default=None, metavar="FILE",
                   help="print the markdown table of a --suite JSON file (for the README)")
    p.add_argument("--repeats", type=int, default=None, metavar="R",
                   help="timed runs per measurement (default 20, or 100 below batch 16; with --suite the most, "
                        "default 50, within about 10 s)")
    p.add_argument("--no-compile-times", action="store_true",
                   help="skip the cold/warm compile probes (two fresh processes; 50-90 s on a cold cache)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--tune", action="store_true",
                   help="time the conv strategies of shapes never timed and remember the choices (a cold "
                        "start takes a static rule instead)")
    p.add_argument("--ranks", default=None, metavar="LIST",
                   help="with --train: launch the step on each number of MPI ranks (e.g. 1,2; mpiexec, "
                        "graphc[mpi]) and report step time, images/s, scaling efficiency, the allreduce "
                        "share and the projected efficiency of larger runs")
    p.set_defaults(func=cmd_bench)


def _add_predict_parser(sub):
    """`graphc predict`'s options (graphc.predict defines them)."""
    from graphc.predict import add_predict_arguments
    p = sub.add_parser("predict", help="classify images with a trained model",
                       formatter_class=_Formatter,
                       description="Print the top-k classes and probabilities of each image, preprocessed as "
                                   "recorded at training.",
                       epilog="examples:\n"
                              "  graphc predict run.npz digit.png                 # graphc train --save's checkpoint\n"
                              "  graphc predict run.npz a.png b.png photos/       # files and folders\n"
                              "  graphc predict run.npz batch.npy --top-k 5       # an .npy of one image or a batch\n"
                              "  graphc predict lenet5 digit.png                  # untrained weights")
    add_predict_arguments(p)
    p.set_defaults(func=cmd_predict)


def build_parser():
    from graphc import __version__
    top = _Parser(prog="graphc", formatter_class=_Formatter,
                  description="graphc: a computational-graph compiler for CNNs.",
                  epilog="examples:\n"
                         "  graphc summary lenet5\n"
                         "  graphc render seed_cnn --backward --values -o seed.svg\n"
                         "  graphc bench lenet5 --train --batch 64 --compare torch\n"
                         "  graphc train lenet5 --epochs 5 --optimizer adam --save run.npz\n"
                         "  graphc predict run.npz digit.png\n\n"
                         "MODEL is a zoo name or path/to/file.py:function. `graphc VERB --help` for each verb.\n"
                         "Errors are one line; add --debug (anywhere) for the traceback.")
    top.add_argument("--version", action="version", version=f"graphc {__version__}")
    top.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = top.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    p = sub.add_parser("summary", help="table of ops, output shapes and parameter counts",
                       formatter_class=_Formatter,
                       description="Print every op of MODEL with its output shape and trainable parameters.",
                       epilog="examples:\n  graphc summary lenet5          # 61,706 parameters\n"
                              "  graphc summary alexnet         # 62,378,344 parameters\n"
                              "  graphc summary resnet18        # 11,689,512 parameters, as torchvision\n"
                              "  graphc summary my_net.py:build\n\nzoo models: " + _zoo_names())
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--backward", action="store_true", help="summarise the differentiated graph")
    p.set_defaults(func=cmd_summary)

    _add_render_parser(sub)
    _add_bench_parser(sub)
    p = sub.add_parser("train", help="train a model on MNIST digits or your own images",
                       formatter_class=_Formatter,
                       description="Train MODEL on the embedded 5,000-digit MNIST subset, MNIST IDX files, an "
                                   ".npz of arrays or a folder of images.",
                       epilog="examples:\n"
                              "  graphc train lenet5 --epochs 5 --optimizer adam --batch 128\n"
                              "  graphc train mnist_convnet --data mnist:~/mnist --epochs 5 --save run.npz\n"
                              "  graphc train lenet5 --epochs 10 --resume run.npz\n"
                              "  graphc train codelab_cnn --data cifar.npz --augment crop:4,flip --lr-schedule "
                              "warmup:1+cosine\n"
                              "  graphc train lenet5 --data images:photos/ --validation 0.1 --early-stopping 3 "
                              "--log run.csv --plots plots/\n"
                              "  mpiexec -n 4 graphc train resnet --batch 64     # 4 ranks x 64 = global batch 256")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    from graphc.onnx.cli import add_convert_verb
    add_convert_verb(sub, _Formatter)
    _add_predict_parser(sub)
    return top


def main(argv=None) -> int:
    """Entry point of the `graphc` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "verb", None):
            raise UsageError("choose a command: summary, render, bench, train, predict or convert (see `graphc --help`)")
        return int(args.func(args) or 0)
    except UsageError as e:
        if debug:
            raise
        print(f"graphc: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except (GraphError, OSError) as e:         # OSError: any file the verb could not read or write
        if debug:
            raise
        print(f"graphc: error: {_one_line(_describe(e))}", file=sys.stderr)
        _abort_ranks(EXIT_ERROR)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("graphc: interrupted", file=sys.stderr)
        _abort_ranks(130)
        return 130


def _abort_ranks(code):
    """In a job of several MPI ranks, an error on this one ends them all, none is left waiting for it."""
    dist = sys.modules.get("graphc.distributed")
    if dist is not None:
        dist.abort_after_error(code)


def _describe(e):
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e) or type(e).__name__


def _one_line(s):
    return " ".join(s.split())


if __name__ == "__main__":
    sys.exit(main())
