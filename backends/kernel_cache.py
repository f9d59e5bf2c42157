"""Generated kernels on disk, aligned host buffers and the BLAS thread limit: one copy of each, shared by
every Numba kernel (elementwise groups, pools, shape-generated convolutions).

A generated kernel is a small Python module defining ``kernel``. Exec'd strings cannot be cached by
Numba; a real file can, so it is written into the cache directory under a name hashed from its text
and imported: a second process then loads machine code instead of compiling.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import importlib.util
import ctypes
import os
import sys
import tempfile
import threading
import warnings

import numpy as np

from graphc.errors import BackendError

LOCK = threading.RLock()          # held while a module is loaded or a kernel compiled
_MODULES: dict = {}


def kernel_cache_dir() -> str:
    """Where generated kernels, their Numba cache and the conv strategy choices live:
    ``$GRAPHC_CACHE_DIR``, else ``~/.cache/graphc/kernels``; created on demand."""
    d = os.environ.get("GRAPHC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphc", "kernels")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise BackendError(f"cannot create the kernel cache directory {d!r}: {e} "
                           "(set GRAPHC_CACHE_DIR to a writable directory)") from e
    return d


def write_atomic(path: str, text: str, keep_existing: bool = False) -> None:
    """Writes ``text`` to ``path`` through a temporary file, so a reader never sees half a file; with
    keep_existing, a file another process wrote meanwhile is kept."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if not keep_existing:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)        # fails if another process got there first: keep theirs
            except FileExistsError:
                pass
            except OSError:               # file systems without hard links
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_once(path: str, text: str) -> None:
    """Makes ``path`` hold ``text``: a file with the right content is never rewritten (its mtime keys
    Numba's cache index); any other content (another text, truncated, garbage bytes) is replaced."""
    try:
        with open(path, "rb") as f:
            if f.read() == text.encode("utf-8"):
                return
        stale = True
    except FileNotFoundError:
        stale = False
    write_atomic(path, text, keep_existing=not stale)


def load_generated(src: str, prefix: str):
    """The ``kernel`` of the generated module whose text is ``src`` (written to the cache directory as
    ``<prefix><hash>.py`` first if needed); loaded once per process."""
    name = prefix + hashlib.sha256(src.encode()).hexdigest()[:24]
    k = _MODULES.get(name)
    if k is not None:
        return k
    with LOCK:
        if name in _MODULES:
            return _MODULES[name]
        path = os.path.join(kernel_cache_dir(), name + ".py")
        try:
            write_once(path, src)
        except OSError as e:
            raise BackendError(f"cannot write generated kernel {path!r}: {e}; set GRAPHC_CACHE_DIR "
                               "to a writable directory") from e
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        # registered before running it: Numba finds the module by name when it reloads a cached
        # function's environment (an unregistered module cannot be cached)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:        # the source is right (write_once): a corrupted .pyc beside it
            discard_corrupt([importlib.util.cache_from_source(path)], e)
            spec.loader.exec_module(mod)
        guard_numba_cache(mod)
        skip_cfunc_wrappers(mod)
        _MODULES[name] = mod.kernel
        return mod.kernel


# ------------------------------------------------------------------------ corrupted cache entries

_CHECKED_CACHE = []               # the FunctionCache subclass below, made on first use (imports Numba)
_WARNED = [False]


def discard_corrupt(paths, err, what="a corrupted kernel cache entry") -> None:
    """Deletes the files of a corrupted cache entry (a truncated or garbage Numba index/data file or
    .pyc); warns once per process, in one line, what was found."""
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)
    if not _WARNED[0]:
        _WARNED[0] = True
        why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        warnings.warn_explicit(f"graphc: discarded {what} ({paths[0]}: {why}); the kernel is compiled "
                               "instead (further such entries are discarded silently)", RuntimeWarning, "graphc", 0)


def skip_cfunc_wrappers(*modules) -> None:
    """Numba compiles each CPU @njit function of these modules without its C-callable wrapper (the
    ``no_cfunc_wrapper`` jit option; set here before their first compile so every kernel of the backend,
    generated ones too, gets it in one place): graphc calls its kernels from Python (the CPython
    wrapper) and from other @njit functions (directly), never through a C function pointer, and the
    wrapper's IR, optimisation and machine code cost mnist_convnet's cold training step about 0.3 s of
    its 5 s of compile CPU. The flag is not part of Numba's cache key: entries load either way."""
    from numba.core.registry import CPUDispatcher
    for mod in modules:
        for obj in list(vars(mod).values()):
            if isinstance(obj, CPUDispatcher):
                obj.targetoptions.setdefault("no_cfunc_wrapper", True)


_SYMBOLS_READY: list = []


def _runtime_symbols_ready(target_context) -> None:
    """What a cached kernel's machine code links against, without the rest of Numba's start-up.

    Numba's own cache load first refreshes the target context: it imports some 40 modules of
    implementations and installs their registries (0.2-0.25 s of a warm start's ~0.85 s on a Zen 5),
    which only a compile needs; Numba's compiler refreshes the context itself when it compiles. Of that
    refresh, loading machine code needs the symbols it registers with LLVM: the NRT's (allocation,
    reference counts) and the hash secret numba.cpython.hashing adds on import. The others a kernel can
    name (Numba's C helpers, exception classes, libm, SVML, the parallel layer's on a parallel kernel's
    reload) are registered when Numba is imported, the CPU context made, or the kernel rebuilt. A symbol
    missing here would abort the process inside LLVM (``Symbol not found``), not raise, so every Numba
    import site that registers symbols (``ll.add_symbol``) was checked, for Numba 0.68."""
    if not _SYMBOLS_READY:
        from numba.core.runtime import rtsys
        import numba.cpython.hashing  # noqa: F401   (registers _numba_hashsecret_* on import)
        rtsys.initialize(target_context)
        _SYMBOLS_READY.append(True)


def guard_numba_cache(*modules) -> None:
    """Makes the cached @njit functions of these modules survive a corrupted Numba cache entry: a load
    or save that fails (UnpicklingError, EOFError, ...) deletes that function's index and data files
    (discard_corrupt) and Numba compiles it again, instead of every later run failing until the cache
    directory is deleted by hand. (Numba itself only tolerates missing files.)"""
    if not _CHECKED_CACHE:
        from numba.core.caching import FunctionCache

        class CheckedCache(FunctionCache):
            def _discard(self, err, what="a corrupted kernel cache entry"):
                f = self._cache_file
                base = os.path.join(glob.escape(f._cache_path), glob.escape(f._index_name[:-len(".nbi")]))
                discard_corrupt([f._index_path] + glob.glob(base + ".*.nbc"), err, what)

            def load_overload(self, sig, target_context):
                # what is written to sys.stderr meanwhile is held back: unpickling some garbage makes
                # CPython print "SystemError: deallocated bytearray object has exported buffers" as it
                # raises MemoryError (a second line beside graphc's warning); kept if the load succeeds
                held = io.StringIO()
                try:
                    _runtime_symbols_ready(target_context)
                    with self._guard_against_spurious_io_errors(), contextlib.redirect_stderr(held):
                        cres = self._load_overload(sig, target_context)
                except Exception as e:       # None: Numba compiles (and save_overload stores it anew)
                    self._discard(e)
                    return None
                if held.getvalue():
                    sys.stderr.write(held.getvalue())
                return cres

            def save_overload(self, sig, data):
                try:
                    super().save_overload(sig, data)
                except Exception as e:       # a full disk, say: the compiled kernel still runs
                    self._discard(e, "a kernel cache entry that could not be saved")
        _CHECKED_CACHE.append((FunctionCache, CheckedCache))
    plain, checked = _CHECKED_CACHE[0]
    for mod in modules:
        for obj in list(vars(mod).values()):
            cache = getattr(obj, "_cache", None)
            if type(cache) is plain:
                cache.__class__ = checked       # the same object, its loads and saves checked


def aligned_empty(shape, dtype, align=64):
    """An empty C-contiguous array whose data starts on a cache-line boundary."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.empty(n * dtype.itemsize + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off:off + n * dtype.itemsize].view(dtype).reshape(shape)


# ------------------------------------------------------------------------------------ BLAS threads

_BLAS_LIBS: list = []
_BLAS_SCANNED = [False, False]      # scanned; SciPy's BLAS was loaded then
_SCIPY_HELD = [False]               # SciPy's BLAS is at one thread (loaded so here, or held so after);
                                    # None: SciPy is not installed


def rescan_blas():
    """Looks for loaded BLAS libraries again (Numba's np.dot loads SciPy's on its first compile)."""
    _BLAS_SCANNED[0] = False


def import_numba_unhighlighted() -> None:
    """Imports Numba, the first time, with its error-message highlighting off. Typing a kernel builds
    an error message for every overload that does not match, and Numba's highlighting wraps stdout and
    stderr in colorama for each: mnist_convnet's cold training step marks up 10,000 messages, 0.075 s
    of CPU (7 us each; 0.04 us unhighlighted) for bold text nobody sees. Numba reads
    ``NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING`` once, at import; it is set for that import only (as
    the user's, if set), so child processes see the user's environment. A Numba imported before
    graphc keeps its highlighting."""
    key = "NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING"
    if "numba" in sys.modules or key in os.environ:
        return
    os.environ[key] = "1"
    try:
        import numba  # noqa: F401
    finally:
        os.environ.pop(key, None)


def load_scipy_blas_single_threaded():
    """Loads SciPy's BLAS (the one Numba's np.dot calls) with OpenBLAS set up for one thread; one loaded
    already is held to one thread from now on. An OpenBLAS started with two threads kept a server thread
    spinning on the other core during graphc's runs although every call was held to one thread: with it,
    ResNet-18's conv kernels ran at half speed on 2 threads in a batch-16 training step (layer4's 3x3 conv
    31 ms, 16 ms without). The environment is restored at once (OpenBLAS reads it when loaded), and the
    library can still be given more threads later (threadpoolctl). Cheap once done: it runs before
    every Numba compile (load_scipy_blas_before_numba)."""
    if "scipy.linalg" in sys.modules:
        # loaded by someone else, maybe with two threads: held to one from now on (once used with
        # two, its thread spun beside graphc's even under a BlasLimit: ResNet-18's training step
        # after an AlexNet run in the same process, 1224-1331 ms instead of 820)
        if not _SCIPY_HELD[0]:
            _SCIPY_HELD[0] = True
            rescan_blas()
            for lc in _blas_libs():
                if "scipy.libs" in lc.filepath or "scipy/linalg" in lc.filepath:
                    lc.set_num_threads(1)
        return
    if _SCIPY_HELD[0] is None:
        return                  # no SciPy (looked for once: this runs before every compile)
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import scipy.linalg.cython_blas  # noqa: F401
        _SCIPY_HELD[0] = True
    except ImportError:         # no SciPy: Numba's np.dot says so when it compiles
        _SCIPY_HELD[0] = None
    finally:
        if saved is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved
    rescan_blas()


_REFRESH_WRAPPED: list = []         # [Numba's own BaseContext.refresh] once wrapped


def load_scipy_blas_before_numba() -> None:
    """SciPy's BLAS loaded single-threaded (load_scipy_blas_single_threaded) just before Numba would load
    it, not when the backend is imported: Numba's refresh of a target context, which starts each of its
    compiles (and precompile's, before workers fork), imports numba.np.arraymath, and that imports
    scipy.linalg to check for a BLAS. (A kernel that calls BLAS also loads it, at run time, when it was
    not compiled in the process: conv/im2col.kernel_ready loads it first.) A start whose kernels are all
    in the disk cache and call no BLAS, as mnist_convnet's training step, never imports scipy.linalg
    (SciPy's array API layer copies numpy's namespace and imports f2py): the backend's import took
    0.33-0.36 s instead of 0.44-0.52, and a warm first step 0.48-0.53 s instead of 0.60-0.61 (medians of
    two batches of 8 and 10 alternating runs)."""
    if _REFRESH_WRAPPED:
        return
    from numba.core.base import BaseContext
    original = BaseContext.refresh

    def refresh(self):
        load_scipy_blas_single_threaded()
        return original(self)
    refresh.__doc__ = original.__doc__
    BaseContext.refresh = refresh
    _REFRESH_WRAPPED.append(original)


def _blas_libs():
    if _BLAS_SCANNED[0] and not _BLAS_SCANNED[1] and "scipy.linalg" in sys.modules:
        _BLAS_SCANNED[0] = False          # SciPy's BLAS was loaded since the last look: look again
    if not _BLAS_SCANNED[0]:
        _BLAS_SCANNED[1] = "scipy.linalg" in sys.modules
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_LIBS[:] = [lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas"]
        except Exception:         # pragma: no cover - threadpoolctl missing or failing: nothing to limit
            _BLAS_LIBS[:] = []
        _BLAS_SCANNED[0] = True
    return _BLAS_LIBS


def _thread_calls(lc):
    """(get, set) of a BLAS's thread count: OpenBLAS's own C functions where threadpoolctl finds them (it
    takes 0.7 us to ask and 1.6 us to set through threadpoolctl, 0.1 us directly: a BlasLimit around every
    run of two loaded OpenBLAS cost 3-10 us, a fifth of a batch-1 MNIST inference), else threadpoolctl's."""
    try:
        if lc.internal_api == "openblas" and lc.threading_layer == "pthreads":
            get, put = lc._get_symbol("openblas_get_num_threads"), lc._get_symbol("openblas_set_num_threads")
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    except Exception:  # pragma: no cover - another threadpoolctl
        pass
    return lc.get_num_threads, lc.set_num_threads


_THREAD_CALLS: list = [None, ()]     # [the _BLAS_LIBS list's contents they are for, ((get, set), ...)]


def _all_thread_calls():
    libs = _blas_libs()
    if _THREAD_CALLS[0] != libs:         # (compared by identity of its controllers: a rescan)
        _THREAD_CALLS[:] = [list(libs), tuple(_thread_calls(lc) for lc in libs)]
    return _THREAD_CALLS[1]


_LAZY: list = []          # the lazily entered BlasLimits, innermost last


class BlasLimit:
    """``with BlasLimit(n):`` holds every loaded BLAS to n threads (None: leaves them alone), restoring
    their counts afterwards (a library at n already is left alone). OpenBLAS's spinning threads beside
    Numba's workers made steps 2.4-2.9x slower (two thread pools on two cores fight).

    ``lazy=True`` (the numba executor's, around every run): nothing happens on entry; the first
    ``blas_in_use()`` inside applies the limit (undone on exit). A run that calls no BLAS (a batch-1
    MNIST inference: its small product is kernels/small_matmul.py's) is spared the four calls into
    OpenBLAS, ~1 us of its ~26."""

    def __init__(self, threads=1, lazy=False):
        self.threads = threads
        self.lazy = lazy
        self._saved = []

    def __enter__(self):
        if self.lazy:
            self._saved.append(None)     # (applied by blas_in_use)
            _LAZY.append(self)
        else:
            blas_in_use()                # (a lazy limit around this one first: its restore is the outer one)
            self._saved.append(self._apply())
        return self

    def _apply(self):
        changed = []
        t = self.threads
        if t is not None:
            for get, put in _all_thread_calls():
                n = get()
                if n != t:
                    put(t)
                    changed.append((put, n))
        return changed

    def __exit__(self, *exc):
        if self.lazy:
            _LAZY.pop()
        for put, n in self._saved.pop() or ():
            put(n)


def blas_in_use():
    """Called before a BLAS call: applies the innermost lazily entered BlasLimit, once per entry."""
    if _LAZY:
        lim = _LAZY[-1]
        if lim._saved[-1] is None:
            lim._saved[-1] = lim._apply()


def loaded(prefix):
    """The kernels loaded so far whose module names start with `prefix` (tests, diagnostics)."""
    return [k for name, k in _MODULES.items() if name.startswith(prefix)]
