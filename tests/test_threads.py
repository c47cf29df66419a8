"""spectral_kernels/_threads.py: the named process-wide pools of the SVD cache and the fused pass."""
from __future__ import annotations

import threading

from spectral_kernels._threads import shared_pool


def test_one_pool_per_name_and_size():
    a = shared_pool("test-a", 2)
    assert shared_pool("test-a", 2) is a
    assert shared_pool("test-b", 2) is not a
    resized = shared_pool("test-a", 3)
    assert resized is not a and resized._max_workers == 3
    names = set(resized.map(lambda _: threading.current_thread().name, range(6)))
    assert all(n.startswith("spectral-kernels-test-a") for n in names), names
