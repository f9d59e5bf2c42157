"""maxpool(relu(conv(x, w) + b)) in one kernel, the conv output never reaching global memory: each thread
one pooled output; blocks of up to 16x16 pooled pixels times up to FUSE_KZ output channels (block z), the
filter slices of those channels staged in shared memory chunk by chunk; the grid is (pooled-width tiles,
pooled-height tiles, N*K / block-z). Windows of more than FUSE_MAXWIN positions or filters of more than
FUSE_FSM taps, and grouped or dilated convs, take conv + max pool + ReLU/route fix-up kernels instead."""
from __future__ import annotations

import numpy as np

from graphc.backends.cuda.kernels.device import (alloc_flat, cdiv, check_shape, dummy, empty, factory, fdtype, flat,
                                                 kernel, launcher, p2, pair, seq)
from graphc.backends.cuda.kernels.elementwise import elementwise_kernel
from graphc.backends.cuda.kernels.gemm import conv_geometry, conv_step
from graphc.backends.cuda.kernels.pool import maxpool_step
from graphc.errors import BackendError

cuda = None                     # numba.cuda (bound by device.kernel)
FUSE_FSM = 1024                 # filter elements per channel slot in shared memory
FUSE_KZ = 4                     # output channels per block (block z) at most
FUSE_MAXWIN = 16                # pool-window positions kept per thread at most


@factory("conv_relu_pool", "fa, fa, fa, fa, ia, i64*21")
def _mk_conv_relu_pool(nbt):
    def conv_relu_pool(x, w, b, y, route, N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl,
                       PH, PW, psh, psw, Hp, Wp, cc, flags):
        sf = cuda.shared.array((FUSE_KZ, FUSE_FSM), nbt)
        acc = cuda.local.array(FUSE_MAXWIN, nbt)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tz = cuda.threadIdx.z
        bdx = cuda.blockDim.x
        bdy = cuda.blockDim.y
        bdz = cuda.blockDim.z
        nt = bdx * bdy * bdz
        t = (tz * bdy + ty) * bdx + tx
        pw = cuda.blockIdx.x * bdx + tx
        ph = cuda.blockIdx.y * bdy + ty
        KHKW = KH * KW
        NK = N * K
        NWIN = PH * PW
        has_bias = (flags & 1) != 0
        save_route = (flags & 2) != 0
        zero = nbt(0)
        for nk0 in range(cuda.blockIdx.z * bdz, NK, cuda.gridDim.z * bdz):
            nk = nk0 + tz
            n = nk // K
            k = nk - n * K
            active = nk < NK and ph < Hp and pw < Wp
            for wi in range(NWIN):
                acc[wi] = zero
            for c0 in range(0, C, cc):
                cn = C - c0
                if cn > cc:
                    cn = cc
                chunk = cn * KHKW
                # all threads stage the filter slices [k, c0:c0+cn] of the block's channels
                for e in range(t, bdz * chunk, nt):
                    z = e // chunk
                    q = e - z * chunk
                    nkz = nk0 + z
                    if nkz < NK:
                        kz = nkz % K
                        sf[z, q] = w[(kz * C + c0) * KHKW + q]
                cuda.syncthreads()
                if active:
                    for wi in range(PH):
                        oh = ph * psh + wi
                        for wj in range(PW):
                            ow = pw * psw + wj
                            s = acc[wi * PW + wj]
                            for ci in range(cn):
                                xb = (n * C + c0 + ci) * H
                                fb = ci * KHKW
                                for kh in range(KH):
                                    ih = oh * sh - pt + kh
                                    if ih >= 0 and ih < H:
                                        xr = (xb + ih) * W
                                        fr = fb + kh * KW
                                        for kw in range(KW):
                                            iw = ow * sw - pl + kw
                                            if iw >= 0 and iw < W:
                                                s += x[xr + iw] * sf[tz, fr + kw]
                            acc[wi * PW + wj] = s
                cuda.syncthreads()
            if active:
                bv = zero
                if has_bias:
                    bv = b[k]
                best = acc[0] + bv
                first = (ph * psh) * Wo + pw * psw
                bidx = first
                for wi in range(PH):
                    for wj in range(PW):
                        v = acc[wi * PW + wj] + bv
                        if v > best or (v != v and best == best):      # the first NaN wins (np.max)
                            best = v
                            bidx = (ph * psh + wi) * Wo + pw * psw + wj
                o = (nk * Hp + ph) * Wp + pw
                if best > zero:
                    y[o] = best
                    if save_route:
                        route[o] = bidx
                else:               # ReLU: 0, or NaN; the route: ~ the first max of the ReLU output
                    y[o] = best if best != best else zero
                    if save_route:
                        route[o] = -1 - (bidx if best != best else first)
    return conv_relu_pool


def _unfused_step(x, w, bias, y, route, geom, pool, pool_stride, scratch):
    """conv (+bias, ReLU) into scratch, max pool with its route, then the route fix-up (maxpool_argmax's
    relu rule: ~route where the max is not > 0)."""
    N, C, H, W, K, KH, KW, Ho, Wo = geom[:9]
    PH, PW = pool
    psh, psw = pool_stride
    Hp, Wp = (Ho - PH) // psh + 1, (Wo - PW) // psw + 1
    z = scratch(N * K * Ho * Wo, y.dtype)
    rt = route if route is not None else scratch(N * K * Hp * Wp, np.int32)
    fix_route = elementwise_kernel("a1 if a0 > 0 else -1 - a1", 2)
    steps = [conv_step(x, w, bias, z, geom, relu=True), maxpool_step(z, y, rt, (N, K, Ho, Wo), pool, pool_stride)]
    if route is not None:
        steps.append(lambda: fix_route(y, rt, out=rt))
    return seq(steps)


def conv_pool_step(x, w, bias, y, route, geom, pool, pool_stride, scratch):
    """y = maxpool(relu(conv(x, w) + bias)) (+ the int32 route, ~ it where the window max is not > 0) on flat
    arrays; geom = gemm.conv_geometry(...); scratch(n, dtype) allocates work arrays."""
    N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt, pl = geom[:13]
    PH, PW = pool
    psh, psw = pool_stride
    Hp, Wp = (Ho - PH) // psh + 1, (Wo - PW) // psw + 1
    if PH * PW > FUSE_MAXWIN or KH * KW > FUSE_FSM or tuple(geom[13:]) != (1, 1, 1):
        return _unfused_step(x, w, bias, y, route, geom, pool, pool_stride, scratch)
    cc = max(1, min(C, FUSE_FSM // (KH * KW)))
    bx, by = p2(Wp, 16), p2(Hp, 16)
    bz = max(1, min(FUSE_KZ, 256 // (bx * by), p2(N * K, FUSE_KZ)))
    grid = (cdiv(Wp, bx), cdiv(Hp, by), max(1, min(cdiv(N * K, bz), 65535)))
    flags = (1 if bias is not None else 0) | (2 if route is not None else 0)
    dt = np.dtype(y.dtype)
    return launcher(kernel("conv_relu_pool", dt), grid, (bx, by, bz), x, w, bias if bias is not None else dummy(dt),
                    y, route if route is not None else dummy(np.int32), N, C, H, W, K, KH, KW, Ho, Wo, sh, sw, pt,
                    pl, PH, PW, psh, psw, Hp, Wp, cc, flags)


def conv2d_relu_maxpool(x, w, b=None, stride=1, pads=0, pool_size=2, pool_stride=None, save_route=False):
    """maxpool(relu(conv2d(x, w) + b)) in one kernel; the conv output never reaches global memory.

    ``route`` (int32, shaped like y) holds the flat index ``i*Wo + j`` of each window's max in the
    conv-output plane, or ~index (< 0) where that max was not > 0 (then y is 0 or NaN, and the gradient
    dy * 0): graphc.ops.fused.maxpool_argmax_ref's relu rule.
    """
    check_shape(x, 4, "conv2d_relu_maxpool x")
    check_shape(w, 4, "conv2d_relu_maxpool w")
    dt = fdtype(x, w, b)
    geom = conv_geometry(x.shape, w.shape, stride, pads)
    N, K, Ho, Wo = geom[0], geom[4], geom[7], geom[8]
    pool = pair(pool_size, "pool_size")
    pst = pair(pool_stride if pool_stride is not None else pool_size, "pool_stride")
    Hp, Wp = (Ho - pool[0]) // pst[0] + 1, (Wo - pool[1]) // pst[1] + 1
    if Hp < 1 or Wp < 1:
        raise BackendError(f"conv2d_relu_maxpool: pool {pool[0]}x{pool[1]} larger than the conv output {Ho}x{Wo}")
    if b is not None and b.size != K:
        raise BackendError(f"conv2d_relu_maxpool: bias has {b.size} elements, expected {K}")
    y = empty((N, K, Hp, Wp), dt)
    route = empty((N, K, Hp, Wp), np.int32) if save_route else None
    if y.size:
        conv_pool_step(flat(x), flat(w), None if b is None else flat(b), flat(y),
                       None if route is None else flat(route), geom, pool, pst, alloc_flat)()
    return (y, route) if save_route else y
