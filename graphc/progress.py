"""Progress for long loops and waits: tqdm.auto bars (a widget in Jupyter, a bar on a terminal, a line
every few seconds when stderr is piped to a file) and a ticker that keeps a bar's clock running while
one long call (kernel compilation) blocks."""
from __future__ import annotations

import contextlib
import sys
import threading

__all__ = ["progress_bar", "Ticker", "kernel_count", "executors_quiet"]


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(progress, **kw):
    """A tqdm.auto bar (a widget in Jupyter) on stderr, or None. Piped, it redraws every 5 s only."""
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.1 if _isatty(sys.stderr) else 5.0,
                **kw)


class Ticker:
    """Refreshes a bar twice a second while a long call (kernel compilation) blocks the loop, so its clock
    runs."""

    def __init__(self, bar):
        self.bar, self.done = bar, threading.Event()

    def _tick(self):
        while not self.done.wait(max(0.5, getattr(self.bar, "mininterval", 0.5))):   # piped: every 5 s
            self.bar.refresh()

    def __enter__(self):
        if self.bar is not None:
            self.thread = threading.Thread(target=self._tick, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.done.set()
            self.thread.join()
        return False


@contextlib.contextmanager
def executors_quiet(exes):
    """Within the block the executables' own "graphc: compiling N kernels" lines (the numba backend's
    ``progress``) are off: a caller's bar reports the compilation instead."""
    saved = [(e, e.progress) for e in exes if hasattr(e, "progress")]
    for e, _ in saved:
        e.progress = None
    try:
        yield
    finally:
        for e, p in saved:
            e.progress = p


def kernel_count(exe) -> int:
    """Compiled kernels of an executable: its non-source nodes that are not views (reshape, identity...)."""
    from graphc import ops as optable
    return sum(1 for _, d in exe.graph.nx.nodes(data=True)
               if d["op"] not in ("input", "param", "const", "getitem")
               and not getattr(optable.OPS.get(d["op"]), "alias", False))
