"""Backend selection: which implementation of an op runs.

Three ways to choose, strongest first:

1. the ``backend=`` argument of an op (``"auto"`` defers to the next two);
2. the :func:`use_backend` context manager;
3. the ``SPECTRAL_KERNELS_BACKEND`` environment variable.

``"auto"`` resolves per call and per direction (forward, backward) from the measured rules of
``spectral_kernels/plans.py``: on CUDA tensors in fp32/fp16/bf16, ``"cuda"`` where the compiled
decode plan measured faster (when ``spectral_kernels._C`` is built for the device), ``"triton"``
where a Triton plan did, ``"torch"`` (cuBLAS) otherwise; ``"torch"`` for CPU tensors and float64.
An explicit request for a backend that cannot run the call raises :class:`BackendUnavailableError`
saying why; it never silently falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from spectral_kernels import plans

#: Every backend name an op accepts. "cuda" is the compiled extension ``spectral_kernels._C``;
#: it is a known name even when the extension is not built (then it reports why it is unavailable).
BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "SPECTRAL_KERNELS_BACKEND"

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "spectral_kernels_backend", default=None
)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run, and the reason in words."""

    name: str
    available: bool
    reason: str


def triton_interpret_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton; Linux x86-64 only)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break the package import
        return f"triton failed to import: {exc!r}"
    return None


def backend_status(name: str, device: torch.device | None = None) -> BackendStatus:
    """Say whether backend ``name`` can run on ``device`` (None: the best device here)."""
    if name == "torch":
        return BackendStatus(name, True, "pure PyTorch, runs on every device")
    if name == "triton":
        err = _triton_import_error()
        if err is not None:
            return BackendStatus(name, False, err)
        import triton

        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return BackendStatus(name, False, "no CUDA device is visible to torch")
            return BackendStatus(name, True, f"triton {triton.__version__} on CUDA")
        if triton_interpret_enabled():
            return BackendStatus(
                name, True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), slow"
            )
        return BackendStatus(
            name,
            False,
            f"triton kernels need CUDA tensors, got device '{device.type}' "
            "(set TRITON_INTERPRET=1 before importing spectral_kernels to run them on CPU)",
        )
    if name == "cuda":
        from spectral_kernels import _ext

        return BackendStatus(name, *_ext.cuda_status(device))
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on backend ``name`` (unless a call passes its own).

    Example::

        with spectral_kernels.use_backend("torch"):
            y = layer(x)
    """
    token = _context_backend.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _context_backend.reset(token)


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for: the argument, else the context manager, else the env var, else auto."""
    _check_name(backend, "backend argument")
    if backend != "auto":
        return backend
    return _ambient_backend()


# torch.compile cannot trace a ContextVar read; the choice is taken once, when the graph is traced.
@torch.compiler.assume_constant_result
def _ambient_backend() -> str:
    """The backend set by use_backend, else by SPECTRAL_KERNELS_BACKEND, else "auto"."""
    ctx = _context_backend.get()
    if ctx is not None and ctx != "auto":
        return ctx
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


#: dtypes the compiled backends (triton, cuda) compute in; "auto" sends the others to torch.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _auto_prefers_cuda(device: torch.device, dtype: torch.dtype | None, shape: tuple[int, int, int, int]) -> bool:
    """The compiled backend is available here and its plan for this shape is the one to run."""
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return False
    if not plans.prefers_cuda(*shape):  # cheap rule first: the status below queries the device
        return False
    return backend_status("cuda", device).available


def _auto_prefers_triton(phase: str, shape: tuple[int, int, int, int] | None, has_weight: bool) -> bool:
    """Whether "auto" runs this call of a CUDA tensor on triton rather than torch (cuBLAS)."""
    return plans.prefers_triton(phase, shape, has_weight)


PHASES = ("forward", "backward")


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    shape: tuple[int, int, int, int] | None = None,
    phase: str = "forward",
    has_weight: bool = True,
    *,
    bank: bool = False,
) -> str:
    """Turn a request (possibly "auto") into a concrete backend that can run on ``device``.

    ``shape`` = (tokens, in_features, out_features, k), ``phase`` ("forward" or "backward") and
    ``has_weight`` (delta form) let "auto" pick per plan from the measured rules of
    ``spectral_kernels/plans.py``: on CUDA, the forward of the shapes the compiled decode plan
    serves better goes to "cuda" when ``spectral_kernels._C`` is built for this device; the calls
    where a Triton plan measured faster to "triton"; the rest to "torch", whose products run on
    cuBLAS. ``bank`` (d is an adapter bank [n, k] with a per-token index): "auto" picks torch,
    the only bank backend measured so far (triton's fold plan, the one "auto" takes on CUDA, cannot
    apply a per-token d; the bank plans of triton and cuda have not been timed on a GPU).

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run here; the message
            says why.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    name = requested_backend(backend)
    if name == "auto":
        if bank:
            return "torch"
        kernel_dtype = dtype is None or dtype in KERNEL_DTYPES
        if device.type == "cuda" and kernel_dtype:
            if phase == "forward" and shape is not None and _auto_prefers_cuda(device, dtype, shape):
                return "cuda"
            if _auto_prefers_triton(phase, shape, has_weight) and backend_status("triton", device).available:
                return "triton"
        return "torch"
    status = backend_status(name, device)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {status.reason}")
    return name
