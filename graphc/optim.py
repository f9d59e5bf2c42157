"""Optimizers as graph updates: each adds gate-op update subgraphs (role "update") that compute every
parameter's (and every state's) next value, so forward + backward + update is one graph.

Optimizer state (learning rate, momentum/velocity buffers, step count) are non-trainable `param` nodes
named "optim/...": saved and restored with the parameters (`exe.state_dict()`), and the learning rate can
be changed between steps without recompiling (`exe.state["optim/lr"][...] = 0.01`). A schedule
(graphc.schedules: step decay, cosine, warm-up) multiplies it by a factor computed in the graph from a
step counter that is state too, so schedules checkpoint and resume with the rest.
"""
import math

import numpy as np

from graphc.errors import GraphError


def hyper(owner, name, value, low=0.0, high=math.inf, low_open=True, high_open=True):
    """A finite real hyper-parameter in its range (e.g. lr in (0, inf)); anything else is a GraphError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = None
    if isinstance(value, bool) or v is None or not math.isfinite(v) or \
            not (low < v if low_open else low <= v) or not (v < high if high_open else v <= high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise GraphError(f"{owner}: {name} must be a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v


class Optimizer:
    name = "optimizer"
    schedule = None          # a graphc.schedules schedule: the learning rate's factor, computed in the graph

    def _lr(self, g):
        """The learning rate of this step: the state optim/lr, times the schedule's factor when there is one."""
        lr = self._state(g, "optim/lr", value=self.lr)
        return lr if self.schedule is None else self.schedule.attach(g, lr)

    def _set_schedule(self, schedule):
        from graphc.schedules import Schedule
        if schedule is not None and not isinstance(schedule, Schedule):
            raise GraphError(f"{type(self).__name__}: schedule must be a gc.schedules schedule "
                             f"(gc.schedules.Cosine(1000), ...), got {type(schedule).__name__}")
        self.schedule = schedule

    def build(self, g, grads):
        """Adds the update nodes to training graph `g`; grads maps param name -> gradient value."""
        raise NotImplementedError

    def _state(self, g, name, like=None, value=None):
        if value is None:
            value = np.zeros(g.nx.nodes[like]["shape"], g.nx.nodes[like]["dtype"])
        with g.role("forward"):
            return g.param(name, value=np.asarray(value, dtype=g.dtype), trainable=False)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class SGD(Optimizer):
    """Mini-batch SGD, with momentum and weight decay as AlexNet's rule (the course notes):
    v = momentum*v - weight_decay*lr*w - lr*dL/dw;  w = w + v.   (momentum 0: w = w - lr*(dL/dw + wd*w))"""

    def __init__(self, lr, momentum=0.0, weight_decay=0.0, schedule=None):
        self.lr = hyper("SGD", "lr", lr)
        self.momentum = hyper("SGD", "momentum", momentum, 0.0, 1.0, low_open=False)
        self.weight_decay = hyper("SGD", "weight_decay", weight_decay, low_open=False)
        self._set_schedule(schedule)

    def build(self, g, grads):
        lr = self._lr(g)
        rule = "sgd:momentum" if self.momentum else "sgd"
        with g.role("update"), g.rule(rule):
            for p, gp in grads.items():
                w = g[p]
                step = g.mul(lr, g[gp])
                if self.weight_decay:
                    step = g.add(step, g.mul(g.mul(g.scalar(self.weight_decay), lr), w))
                if self.momentum:
                    v = self._state(g, f"optim/v/{p}", like=p)
                    v_new = g.sub(g.mul(g.scalar(self.momentum), v), step, name=f"update/optim/v/{p}")
                    g.updates[v.name] = v_new.name
                    new = g.add(w, v_new, name=f"update/{p}")
                else:
                    new = g.sub(w, step, name=f"update/{p}")
                g.updates[p] = new.name


class Adam(Optimizer):
    """Adam (seeds/000): m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    w = w - lr * m_hat / (sqrt(v_hat) + eps) with the bias corrections m_hat = m/(1-b1^t), v_hat = v/(1-b2^t)
    of the Adam paper; bias_correction=False gives the seed's uncorrected form w - lr m/(sqrt(v)+eps)."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction=True, schedule=None):
        self.lr = hyper("Adam", "lr", lr)
        self.beta1 = hyper("Adam", "beta1", beta1, 0.0, 1.0)     # open: the bias correction takes log(beta)
        self.beta2 = hyper("Adam", "beta2", beta2, 0.0, 1.0)
        self.eps = hyper("Adam", "eps", eps)
        self.bias_correction = bias_correction
        self._set_schedule(schedule)

    def build(self, g, grads):
        b1, b2 = self.beta1, self.beta2
        lr = self._lr(g)
        with g.role("update"), g.rule("adam"):
            if self.bias_correction:
                t = self._state(g, "optim/t", value=0.0)
                t_new = g.add(t, g.scalar(1.0), name="update/optim/t")
                g.updates[t.name] = t_new.name
                # 1 / (1 - b^t), with b^t = exp(t log b): shared by every parameter
                c1 = g.div(g.scalar(1.0), g.sub(g.scalar(1.0), g.exp(g.mul(t_new, g.scalar(math.log(b1))))))
                c2 = g.div(g.scalar(1.0), g.sub(g.scalar(1.0), g.exp(g.mul(t_new, g.scalar(math.log(b2))))))
            for p, gp in grads.items():
                w, dw = g[p], g[gp]
                m = self._state(g, f"optim/m/{p}", like=p)
                v = self._state(g, f"optim/v/{p}", like=p)
                m_new = g.add(g.mul(g.scalar(b1), m), g.mul(g.scalar(1 - b1), dw), name=f"update/optim/m/{p}")
                v_new = g.add(g.mul(g.scalar(b2), v), g.mul(g.scalar(1 - b2), g.mul(dw, dw)),
                              name=f"update/optim/v/{p}")
                mh, vh = (g.mul(m_new, c1), g.mul(v_new, c2)) if self.bias_correction else (m_new, v_new)
                step = g.div(g.mul(lr, mh), g.add(g.sqrt(vh), g.scalar(self.eps)))
                new = g.sub(w, step, name=f"update/{p}")
                g.updates.update({m.name: m_new.name, v.name: v_new.name, p: new.name})


def momentum(lr, momentum=0.9, weight_decay=0.0, schedule=None):
    return SGD(lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule)
