"""Backends lower a scheduled graph to runnable kernels: reference (numpy), numba (CPU), cuda."""
