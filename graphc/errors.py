"""graphc's errors: every mistake a user can make raises one of these, never a bare numpy/Numba traceback."""


class GraphError(Exception):
    """Root of every graphc error."""


class ShapeError(GraphError):
    """Shapes that do not fit an op's rule (at definition time or in a feed)."""


class DTypeError(GraphError):
    """A dtype an op or a feed does not accept."""


class FeedError(GraphError):
    """A run was fed wrongly: a missing or unknown input, a wrong shape, dtype or non-finite value."""


class DataError(GraphError):
    """A dataset file that cannot be read: wrong magic number, truncated, mismatched counts."""


class CheckpointError(GraphError):
    """A checkpoint that does not match the graph it is loaded into."""


class OutputError(GraphError):
    """An output file (checkpoint, rendering, benchmark JSON) that cannot be written: a missing or
    read-only directory, a full disk, no permission."""


class BackendError(GraphError):
    """A backend that cannot run here (no GPU, no simulator) or an op it has no kernel for."""


class GradError(GraphError):
    """Differentiation failed: a non-scalar loss, an op with no gradient rule, or a failed gradient check."""


class InstallError(GraphError, ImportError):
    """graphc's own modules cannot be imported: a checkout that was not installed, or a broken install."""


class FeedShapeError(FeedError, ShapeError):
    """A fed array whose shape does not match the input's declared shape."""


class FeedDTypeError(FeedError, DTypeError):
    """A fed array whose dtype the input cannot take."""


class DistributedError(GraphError):
    """Data-parallel training across processes failed: MPI is missing, a rank died or hung (a collective
    timed out), or the ranks disagree (different graphs, batch sizes or a checkpoint only some can read)."""
