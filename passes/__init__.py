"""Graph -> graph passes (installed as graphc.passes).

The pipeline passes, one per file, in the order compile() runs them (graphc.pipeline): check, simplify,
fold, cse, dce, fuse, schedule, memory. patterns.py declares the fusion patterns fuse applies.
transforms/ holds the graph transforms compile() runs before them (autodiff, copies, training);
helpers/ the rewriting helpers they share."""
