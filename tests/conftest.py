"""Shared test setup. Numba kernels are cached on disk (GRAPHC_CACHE_DIR / Numba's cache), so a second
run of the suite reuses them; session-scoped fixtures share compiled executables across tests."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)
