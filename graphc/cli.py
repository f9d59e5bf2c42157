"""The `graphc` command line: summary, render, bench, train.

    graphc summary lenet5
    graphc render seed_cnn --backward --values -o seed.svg
    graphc bench mnist_convnet --train --batch 128 --compare torch --json out.json
    graphc train lenet5 --epochs 5 --optimizer adam

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
    values = rendering.example_feeds(graph, model=args.model) if args.values else None
    fused = True if args.fused else None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = rendering.render(graph, out, format=fmt, backward=backward, layout=layout, fused=fused,
                                  values=values, collapse=args.collapse, rankdir=args.rankdir,
                                  max_label=args.max_label)
    st = rendering.dot_stats(source)
    extra = f", {st['clusters']} fused kernels" if st["clusters"] else ""
    print(f"wrote {out} ({st['nodes']} nodes, {st['edges']} edges{extra})")
    return 0


def cmd_bench(args):
    try:
        from graphc.bench import run_bench
    except ImportError as e:
        raise GraphError(f"`graphc bench` is not available in this build (graphc.bench: {e})") from e
    compare = [c.strip() for c in args.compare.split(",") if c.strip()] if args.compare else None
    result = run_bench(args.model, backend=args.backend, batch=args.batch, train=args.train,
                       fuse=not args.no_fuse, compare=compare, json_path=args.json, tune=args.tune)
    return result if isinstance(result, int) else 0


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


def build_parser():
    from graphc import __version__
    top = _Parser(prog="graphc", formatter_class=_Formatter,
                  description="graphc: a computational-graph compiler for CNNs.",
                  epilog="examples:\n"
                         "  graphc summary lenet5\n"
                         "  graphc render seed_cnn --backward --values -o seed.svg\n"
                         "  graphc bench lenet5 --train --batch 64 --compare torch\n"
                         "  graphc train lenet5 --epochs 5 --optimizer adam\n\n"
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
                        "other models: a deterministic random batch of 1)")
    p.add_argument("--collapse", action="store_true",
                   help="merge each layer, and runs of identical layers (conv3_[1-3] x3), into one node")
    p.add_argument("--rankdir", choices=("TB", "LR", "BT", "RL"), default=None,
                   help="rank direction (default LR for short graphs, TB for long ones)")
    p.add_argument("--max-label", type=int, default=28, metavar="N", help="longest name shown in a label")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("bench", help="time the compiled kernels and the whole step",
                       formatter_class=_Formatter,
                       description="Benchmark MODEL's compiled kernels (per-kernel table, step time, "
                                   "compile times, roofline) and optionally compare with PyTorch/JAX.",
                       epilog="examples:\n"
                              "  graphc bench lenet5 --train --batch 64 --compare torch\n"
                              "  graphc bench mnist_convnet --train --batch 128 --compare torch --json out.json\n"
                              "  graphc bench mnist_convnet --batch 1            # inference latency\n"
                              "  graphc bench lenet5 --train --no-fuse           # the effect of fusion")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--backend", choices=("numba", "reference", "cuda"), default="numba",
                   help="backend to time (default numba)")
    p.add_argument("--batch", type=int, default=None, metavar="N", help="batch size")
    p.add_argument("--train", action="store_true", help="time a training step (forward+backward+update)")
    p.add_argument("--no-fuse", action="store_true", help="switch the fusion pass off")
    p.add_argument("--compare", default=None, metavar="PEERS",
                   help="comma-separated peers to time in the same run, e.g. torch,jax")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--tune", action="store_true",
                   help="time the conv strategies of shapes never timed and remember the choices (a cold "
                        "start takes a static rule instead)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train a model on MNIST digits",
                       formatter_class=_Formatter,
                       description="Train MODEL on the embedded 5,000-digit MNIST subset (or MNIST IDX files).",
                       epilog="examples:\n"
                              "  graphc train lenet5 --epochs 5 --optimizer adam --batch 128\n"
                              "  graphc train mnist_convnet --data mnist:~/mnist --epochs 5 --save run.npz\n"
                              "  graphc train lenet5 --epochs 10 --resume run.npz")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    from graphc.onnx.cli import add_convert_verb
    add_convert_verb(sub, _Formatter)
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
            raise UsageError("choose a command: summary, render, bench, train or convert (see `graphc --help`)")
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
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("graphc: interrupted", file=sys.stderr)
        return 130


def _describe(e):
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e) or type(e).__name__


def _one_line(s):
    return " ".join(s.split())


if __name__ == "__main__":
    sys.exit(main())
