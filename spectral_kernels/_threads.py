"""One process-wide thread pool per job name, for CPU work that torch does not parallelise itself
(the SVD cache's piece digests, the fused Krylov pass): created on first use, recreated when the
requested size changes."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pools: dict[str, ThreadPoolExecutor] = {}
_sizes: dict[str, int] = {}


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The pool named ``name`` with ``workers`` threads (threads named ``spectral-kernels-<name>``)."""
    with _lock:
        pool = _pools.get(name)
        if pool is None or _sizes[name] != workers:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = _pools[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"spectral-kernels-{name}")
            _sizes[name] = workers
        return pool
