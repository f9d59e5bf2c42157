"""The cuda executable: device arrays over the shared executor (backends/base.py).

Where the data lives. Parameters and optimizer state are device arrays for the executable's whole life.
A training step writes their new values on the device (in place where the memory plan allows, else one
device-to-device copy); nothing goes back to the host per step except the loss (4 or 8 bytes).
``exe.state[name]`` copies a value to the host on access (and, since the caller may change the array it
got, uploads it again before the next run); ``exe.params`` and ``exe.state_dict()`` are host copies;
``exe.load_state_dict`` uploads. ``exe.state["optim/lr"][...] = 0.01`` still changes the learning rate.
Per binding every slot of the memory plan is one device buffer and every value a flat view of its slot;
a run copies the feeds into their device buffers, launches, and copies the fetched values back.

Everything runs on one stream (the default stream). More streams would help (a) to overlap the next
batch's feed upload with this step's compute (pinned host buffers and a copy stream), (b) to run a
layer's independent conv_dx and conv_dw (and the bias-gradient sum) concurrently when each alone cannot
fill the GPU (small batches, late layers), and (c) to overlap host-side work (the dropout mask draws)
with the device. None of these is measured here: no GPU on the machines this was written on.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from graphc import shapes
from graphc.backends.base import CompiledExecutable, LowerContext
from graphc.backends.cuda.kernels import device
from graphc.errors import BackendError, GraphError


class DeviceState(MutableMapping):
    """``exe.state`` of the cuda backend: name -> numpy array, backed by device arrays.

    Reading an entry copies it from the device when the device holds a newer value; since the caller
    may change the array it got (``exe.state["optim/lr"][...] = 0.01``), the entry is uploaded before
    the next run if its bytes changed (a host comparison with the copy read, no transfer otherwise).
    Assigning an entry copies the value in and uploads it before the next run. ``peek`` gives a copy
    without any of this."""

    def __init__(self, host, dev):
        self._host = host          # name -> contiguous numpy array (declared shape)
        self._dev = dev            # name -> flat device array
        self._stale = set()        # the device is newer than the host copy
        self._read = {}            # name -> bytes as read (handed out: upload if they change)
        self._dirty = set()        # assigned on the host: upload

    def _sync(self, n):
        h = self._host[n]
        if n in self._stale:
            if h.size:
                self._dev[n].copy_to_host(h.reshape(-1))
            self._stale.discard(n)
        return h

    def __getitem__(self, n):
        h = self._sync(n)
        if n not in self._dirty:
            self._read[n] = h.tobytes()
        return h

    def __setitem__(self, n, v):
        if n not in self._host:
            raise GraphError(f"no state named {n!r}; states are {list(self._host)[:8]}")
        h = self._host[n]
        arr = np.asarray(v)
        if arr.size != h.size:
            raise GraphError(f"state {n!r} has shape {h.shape}; cannot assign an array of shape {arr.shape}")
        np.copyto(h, arr.reshape(h.shape), casting="unsafe")
        self._stale.discard(n)
        self._read.pop(n, None)
        self._dirty.add(n)

    def __delitem__(self, n):
        raise GraphError("states of a compiled graph cannot be removed")

    def __iter__(self):
        return iter(self._host)

    def __len__(self):
        return len(self._host)

    def __contains__(self, n):
        return n in self._host

    def shape(self, n):
        return self._host[n].shape

    def peek(self, n):
        """A host copy of the current value."""
        return self._sync(n).copy()

    def device(self, n):
        return self._dev[n]

    def push(self):
        """Uploads the entries changed on the host since they were read or assigned; True when any was."""
        if not (self._dirty or self._read):
            return False
        for n, before in self._read.items():
            if self._host[n].tobytes() != before:
                self._dirty.add(n)
        changed = bool(self._dirty)
        for n in self._dirty:
            if self._host[n].size:
                self._dev[n].copy_to_device(self._host[n].reshape(-1))
        self._dirty.clear()
        self._read.clear()
        return changed

    def mark_device_newer(self, names):
        self._stale.update(names)


class CudaContext(LowerContext):
    """LowerContext with the cuda backend's helpers (every array is bound at bind time: flat device arrays)."""

    def arrays(self):
        """The device arrays of the node's inputs."""
        return [self.array(n) for n in self.inputs]

    def alloc(self, n, dtype=None):
        """A private flat work array of n elements (the scratch allocator the kernel steps take)."""
        return self.scratch((max(int(n), 1),), dtype)


class CudaExecutable(CompiledExecutable):
    backend = "cuda"
    conv_module = "cuda kernels (implicit GEMM, fused conv-ReLU-pool)"

    def __init__(self, graph, dtype=None, pipeline=None, **options):
        self._cuda = device.require_cuda()       # BackendError (with the fix) when CUDA cannot run here
        super().__init__(graph, dtype, pipeline, **options)
        if self.dtype not in (np.float32, np.float64):
            raise BackendError(f"the cuda backend runs float32 or float64, not {self.dtype}")

    def _setup(self):
        c = self._cuda
        self.simulator = device.is_simulator()
        self.device = device.cuda_status()[1]
        host, dev = {}, {}
        for n, v in self.state.items():
            h = np.array(v, order="C")     # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
            host[n] = h
            dev[n] = c.to_device(h.reshape(-1))
        self.state = DeviceState(host, dev)
        nodes = self.graph.nx.nodes
        self.consts = {}
        for n in self.schedule:
            if nodes[n]["op"] == "const":
                v = np.ascontiguousarray(self._cast(np.asarray(nodes[n]["attrs"]["value"]), nodes[n]["dtype"]))
                self.consts[n] = (v, c.to_device(v.reshape(-1)))

    # ------------------------------------------------------------------ state (host copies on demand)
    @property
    def params(self):
        """Trainable parameters by name: host copies of the device values."""
        return {n: self.state.peek(n) for n in self.graph.param_names}

    def state_dict(self):
        d = {n: self.state.peek(n) for n in self.state}
        d["__step__"] = np.array(self.step_count)
        return d

    def _push_state(self):
        return self.state.push()

    def _copy_back(self, b, pairs):
        for s, i in pairs:
            self.state.device(s).copy_to_device(b.values[i])

    def _state_written(self, names):
        self.state.mark_device_newer(names)

    # ------------------------------------------------------------------ device storage
    def _alloc(self, nbytes):
        return self._cuda.device_array(nbytes, dtype=np.uint8)

    def _view(self, buf, shape, dtype):
        return buf[:(shapes.numel(shape) or 1) * dtype.itemsize].view(dtype)

    def _scratch(self, shape, dtype):
        return self._cuda.device_array(max(shapes.numel(shape) or 1, 1), dtype=dtype)

    def _state_array(self, name):
        return self.state.device(name)

    def _const_array(self, name):
        return self.consts[name][1]

    def _bind_input(self, b, name, i):
        node = self.graph.nx.nodes[name]
        b.values[i] = self._scratch(shapes.resolve(node["shape"], b.env), self.np_dtype(node["dtype"]))

    def _bind_alias(self, b, name, src):
        b.values[b.slot(name)] = b.values[b.slot(src)]      # flat arrays: a reshape is the same array

    def _context(self, b, name, node):
        return CudaContext(self, b, name, node)

    # ------------------------------------------------------------------ transfers
    def _upload(self, b, feeds):
        values = b.values
        for name, i in b.feeds:
            v = feeds[name]
            if v.size:
                values[i].copy_to_device(np.ascontiguousarray(v).reshape(-1))

    def _fetch(self, b, i, shape):
        return b.values[i].copy_to_host().reshape(shape)

    def _to_host(self, arr, shape):
        return arr.copy_to_host().reshape(shape)

    def _store(self, dst, value):
        v = np.ascontiguousarray(value, dtype=dst.dtype).reshape(-1)
        if v.size:
            dst.copy_to_device(v)

    def _synchronize(self):
        self._cuda.synchronize()
