"""The command line's ONNX pieces: a `.onnx` file wherever a MODEL is taken, and `graphc convert`.

    graphc summary model.onnx
    graphc render model.onnx --backward
    graphc convert model.onnx -o out.onnx          # import, export: a round trip through graphc
    graphc convert lenet5 -o lenet5.onnx --check    # a zoo model (initial weights) as ONNX
"""
from __future__ import annotations

import os

import numpy as np

from graphc.errors import GraphError


def load_model(path, loss=True, **kwargs):
    """A `.onnx` MODEL as the command line uses models: like the zoo's, with a loss when loss is true
    and the model has one output: softmax cross-entropy (input "labels") for a (batch, classes) output,
    else mean squared error (input "targets")."""
    from graphc.onnx.importer import add_loss, load
    if kwargs:
        raise GraphError(f"an ONNX model takes no options {sorted(kwargs)} (they are the zoo's)")
    g = load(path)
    if loss and len(g.outputs) == 1:
        add_loss(g, "softmax_cross_entropy" if len(g[g.outputs[0]].shape) == 2 else "mse")
    return g


def add_convert_verb(sub, formatter_class=None):
    p = sub.add_parser("convert", help="write MODEL as an ONNX file (import + export round trip for .onnx)",
                       formatter_class=formatter_class,
                       description="Write MODEL's inference graph with its weights as an ONNX model "
                                   "(checked with onnx.checker). MODEL may itself be an .onnx file: it is "
                                   "imported into graphc and exported again.",
                       epilog="examples:\n"
                              "  graphc convert model.onnx -o out.onnx\n"
                              "  graphc convert lenet5 -o lenet5.onnx --check\n"
                              "  graphc convert my_net.py:build -o my_net.onnx --opset 13")
    p.add_argument("model", metavar="MODEL", help="a zoo model, path/to/file.py:function or model.onnx")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 17)")
    p.add_argument("--check", action="store_true",
                   help="run MODEL in graphc and the written file in onnxruntime (or in graphc again when "
                        "onnxruntime is absent) on a random batch and report the largest difference")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args):
    from graphc import models
    from graphc.onnx.exporter import save
    if not args.output.lower().endswith(".onnx"):
        raise GraphError(f"-o {args.output!r}: the output file must end in .onnx")
    g = models.load(args.model)
    model = save(g, args.output, opset=args.opset)
    params = sum(int(np.prod(g[n].shape)) for n in g.param_names)
    print(f"wrote {args.output} ({len(model.graph.node)} nodes, {params:,} trainable parameters, "
          f"opset {model.opset_import[0].version})")
    if args.check:
        print(check_roundtrip(g, args.output))
    return 0


def check_roundtrip(g, path, batch=2, seed=0):
    """One line: the largest difference between graphc on `g` and the ONNX file on a random batch."""
    from graphc.backends.reference import lower
    from graphc.onnx.exporter import export_outputs
    from graphc.rendering import example_feeds
    outs = export_outputs(g)
    feeds = example_feeds(g, batch=batch, seed=seed)
    want = lower(g).run(feeds, outputs=outs)
    try:
        from graphc.onnx.peer import run_onnxruntime
        r = run_onnxruntime(path, feeds, expect=want)
        return f"onnxruntime {r['version']}: {'agrees' if r['agree'] else 'DISAGREES'} with graphc " \
               f"(max abs difference {r['max_abs_err']:.3g})"
    except GraphError as e:
        if "needs the onnxruntime package" not in str(e) and "cannot run" not in str(e):
            raise
    from graphc.onnx.importer import load
    h = load(path)
    got = lower(h).run({n: feeds[n] for n in h.inputs})
    err = max(float(np.max(np.abs(got[o] - want[o]))) for o in outs)
    return f"re-imported into graphc (onnxruntime unavailable): max abs difference {err:.3g}"


def is_onnx_path(spec):
    return isinstance(spec, (str, os.PathLike)) and os.fspath(spec).lower().endswith(".onnx")
