"""SpectralLinear: a drop-in nn.Linear whose trainable part is its top-k spectrum.

With the pretrained weight W = U·diag(s)·Vᵀ (top-k factors kept, U [out, k], s [k], V [in, k]) and
trainable coefficients c [k], the layer computes

    delta form:  y = x·Wᵀ + ((x·V) ⊙ (φ(s, c) − s))·Uᵀ + b      (W frozen, exact at init)
    pure form:   y =        ((x·V) ⊙ φ(s, c))·Uᵀ + b            (W dropped; exact only at k = min(in, out))

with φ the mode's coefficient map:

    "scale":  φ = s ⊙ c,   c₀ = 1     (singular value fine-tuning)
    "shift":  φ = s + c,   c₀ = 0     (spectral shift)

so that φ(s, c₀) = s and the delta d = φ − s is exactly zero at initialisation.

Adapter banks: every task adapted on one base shares U, s, V (and W); tasks differ only in c. A
layer keeps named coefficient sets: "default" is the ``coeffs`` parameter (so single-adapter
state_dicts and adapter files keep their ``...coeffs`` keys), the others live in the
``coeff_bank`` ParameterDict, one Parameter [k] each (an adapter no sample used gets no
gradient, so no optimizer step moves it). One set is active (runs and trains); inside
``spectral_kernels.adapter_batch`` each sample of a batch runs with its own set, through the op's
bank path (d [n, k] and a per-sample adapter_index).
"""
from __future__ import annotations

import collections
import contextvars
import functools
import re
import threading
from typing import Iterable

import torch
from torch import Tensor, nn

from spectral_kernels.backends import BACKENDS
from spectral_kernels.ops.spectral_linear import spectral_linear, spectral_linear_with_valid_index
from spectral_kernels.ops.truncated_svd import truncated_svd

MODES = ("scale", "shift")
FORMS = ("delta", "pure")

#: Name of the coefficient set every layer starts with (stored as ``coeffs``).
DEFAULT_ADAPTER = "default"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_rank(rank: object, in_features: int, out_features: int) -> int:
    """in_features and out_features at least 1; rank an int in 1..min(in_features, out_features)."""
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}: a layer without inputs or outputs has "
                             "no spectrum to adapt (leave it out of target_modules)")
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an integer in 1..min(in_features, out_features) = 1..{limit} "
            f"for a layer of in_features={in_features}, out_features={out_features}; got {rank!r}"
        )
    return rank


class SpectralLinear(nn.Module):
    """Linear layer y = x·Wᵀ + ((x·V) ⊙ d)·Uᵀ + b with d = φ(s, c) − s (delta form) or φ(s, c) (pure).

    Build one from a trained layer with :meth:`from_linear`; the constructor makes an empty layer
    of the right shapes (for loading a state_dict).

    Attributes:
        U: buffer ``[out, k]``, frozen left singular vectors.
        s: buffer ``[k]``, the top-k singular values of the source weight.
        V: buffer ``[in, k]``, frozen right singular vectors.
        coeffs: parameter ``[k]``, the trainable coefficients c of the "default" adapter.
        coeff_bank: ParameterDict of the other named adapters' coefficients, ``[k]`` each.
        active_adapter: name of the coefficient set that runs and trains ("default" at first).
        weight: frozen parameter ``[out, in]`` in delta form, None in pure form.
        bias: parameter ``[out]`` or None; trainable only with ``train_bias=True``.
    """

    #: adapter_batch blocks open on this layer in any thread (a class default, so layers pickled
    #: before it existed load): the forward looks up its own thread's block only while one is
    #: open, so a compiled forward outside blocks stays traceable
    _open_batches = 0
    #: the block of this layer's last forward, while that forward ran in one: a forward recomputed
    #: inside a backward (activation checkpointing) after the block closed, by a graph node that no
    #: recorded block's span holds (a nested recompute), runs with it again
    _recorded_batch = None
    #: the last blocks this layer ran in (a deque, created at the first one): a recompute runs with
    #: the block whose span of autograd sequence numbers holds the node being backpropagated, so a
    #: loss accumulated over several blocks (or a forward outside any block between) recomputes
    #: each checkpointed forward with its own block
    _recorded_batches = None
    #: the end of the span of the newest block dropped from a full ``_recorded_batches``
    _dropped_before = -1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        mode: str = "scale",
        form: str = "delta",
        train_bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, in_features, out_features)
        _check_choice("mode", mode, MODES)
        _check_choice("form", form, FORMS)
        _check_choice("backend", backend, BACKENDS)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.mode = mode
        self.form = form
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("U", torch.zeros(out_features, rank, **factory))
        self.register_buffer("s", torch.zeros(rank, **factory))
        self.register_buffer("V", torch.zeros(in_features, rank, **factory))
        init = 1.0 if mode == "scale" else 0.0
        self.coeffs = nn.Parameter(torch.full((rank,), init, **factory))
        self.coeff_bank = nn.ParameterDict()
        self.active_adapter = DEFAULT_ADAPTER
        if form == "delta":
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory), requires_grad=False)
        else:
            self.register_parameter("weight", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=train_bias)
        else:
            self.register_parameter("bias", None)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        mode: str = "scale",
        form: str = "delta",
        *,
        train_bias: bool = False,
        backend: str = "auto",
        svd: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> "SpectralLinear":
        """Spectral layer equal to ``linear`` at initialisation (exactly, in delta form).

        The SVD (:func:`spectral_kernels.truncated_svd`, method "auto") runs in float32 (float64
        for float64 weights) on the weight's device; the factors are stored in the layer's dtype. ``svd=(U [out, r], s [r], V [in, r])`` with r ≥ rank
        passes precomputed factors (e.g. from a model-wide batched SVD); the top ``rank`` are used.

        Raises:
            TypeError: ``linear`` is not an nn.Linear.
            ValueError: rank outside 1..min(in, out), unknown mode/form, or a weight holding
                NaN or Inf.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        W = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, rank, bias=linear.bias is not None, mode=mode,
            form=form, train_bias=train_bias, backend=backend, device=W.device, dtype=W.dtype,
        )
        U, s, V = _top_singular_triplets(W, rank) if svd is None else _check_factors(svd, W, rank)
        layer.U.copy_(U)
        layer.s.copy_(s)
        layer.V.copy_(V)
        if layer.weight is not None:
            layer.weight.copy_(W)
        if layer.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    # --- named adapters ------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Names of the coefficient sets: "default" first, then the added ones in order."""
        return [DEFAULT_ADAPTER, *self.coeff_bank.keys()]

    def named_coefficients(self) -> dict[str, nn.Parameter]:
        """Every coefficient set by name ("default" first): {name: c [k]}."""
        return {DEFAULT_ADAPTER: self.coeffs, **self.coeff_bank._parameters}

    def coefficients(self, adapter: str | None = None) -> nn.Parameter:
        """The coefficient parameter c [k] of ``adapter`` (None: the active one)."""
        name = self.active_adapter if adapter is None else adapter
        if name == DEFAULT_ADAPTER:
            return self.coeffs
        # the ParameterDict's own storage: its __getitem__ goes through Module.__getattr__, a few µs
        # a call, which a mixed batch of many adapters pays per adapter per layer per forward
        param = self.coeff_bank._parameters.get(name) if isinstance(name, str) else None
        if param is None:
            raise KeyError(f"no adapter {name!r} in this layer; adapters: {self.adapter_names()}")
        return param

    def add_adapter(self, name: str) -> None:
        """Add a coefficient set at the mode's identity c₀ (the layer computes its base there);
        frozen until :meth:`set_adapter` or an adapter batch trains it."""
        check_adapter_name(name)
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} already exists; adapters: {self.adapter_names()}")
        init = 1.0 if self.mode == "scale" else 0.0
        self.coeff_bank[name] = nn.Parameter(torch.full_like(self.coeffs.detach(), init), requires_grad=False)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the coefficient set that runs and trains: only its coefficients require grad."""
        self.coefficients(name)  # raises for an unknown name
        self.active_adapter = name
        for n in self.adapter_names():
            self.coefficients(n).requires_grad_(n == name)

    def delete_adapter(self, name: str) -> None:
        """Drop a coefficient set; "default" and the active one cannot be deleted."""
        if name == DEFAULT_ADAPTER:
            raise ValueError('the "default" adapter cannot be deleted (it is the layer\'s coeffs parameter)')
        self.coefficients(name)
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is active; set_adapter another one before deleting it")
        del self.coeff_bank[name]

    # --- math ----------------------------------------------------------------------------------
    def spectrum(self, adapter: str | None = None) -> Tensor:
        """φ(s, c): the layer's current top-k singular values (as a differentiable function of c),
        for ``adapter`` (None: the active one)."""
        return self._spectrum_of(self.coefficients(adapter))

    def coefficient_delta(self, adapter: str | None = None) -> Tensor:
        """d fed to the op: φ(s, c) − s in delta form (written to be exactly 0 at c₀), φ in pure."""
        return self._delta_of(self.coefficients(adapter))

    def _spectrum_of(self, c: Tensor) -> Tensor:
        return self.s * c if self.mode == "scale" else self.s + c

    def _delta_of(self, c: Tensor) -> Tensor:
        """coefficient_delta for coefficients c [k], or for a stack of them [n, k] (a bank)."""
        if self.form == "pure":
            return self._spectrum_of(c)
        return self.s * (c - 1.0) if self.mode == "scale" else c

    def __getstate__(self) -> dict:
        # a copy or pickle of a layer is in no adapter_batch block, open or recorded
        state = self.__dict__.copy()
        state.pop("_open_batches", None)
        state.pop("_recorded_batch", None)
        state.pop("_recorded_batches", None)
        state.pop("_dropped_before", None)
        return state

    def current_batch(self) -> "_BatchAdapters | None":
        """The adapter_batch block open on this layer in the calling thread (or asyncio task), or None."""
        return _OPEN_BATCHES.get().get(id(self)) if self._open_batches else None

    def forward(self, x: Tensor) -> Tensor:
        batch, recompute = self.current_batch(), False
        if batch is None and self._recorded_batches and not torch.compiler.is_compiling():
            if torch._C._current_graph_task_id() != -1:  # inside a backward: a checkpoint's recompute
                batch = self._recomputed_batch()
                recompute = batch is not None
            else:
                self._recorded_batch = None
        if batch is not None:
            if self._recorded_batch is not batch:
                self._record(batch)
            bank, index = batch.bank_and_index(self, x, recompute=recompute)
            # the index was built from adapter names, so its rows are valid by construction: no
            # read-back of its values (a device sync per layer on a GPU)
            return spectral_linear_with_valid_index(x, self.U, bank, self.V, self.bias, self.weight, index,
                                                    backend=self.backend)
        d = self.coefficient_delta().to(x.dtype)
        return spectral_linear(x, self.U, d, self.V, self.bias, self.weight, backend=self.backend)

    #: how many blocks a layer remembers for checkpoint recomputes
    RECORDED_BATCHES = 256

    def _record(self, batch: "_BatchAdapters") -> None:
        self._recorded_batch = batch
        if self._recorded_batches is None:
            self._recorded_batches = collections.deque()
        if not self._recorded_batches or self._recorded_batches[-1] is not batch:
            if len(self._recorded_batches) == self.RECORDED_BATCHES:
                self._dropped_before = self._recorded_batches.popleft().span_end()
            self._recorded_batches.append(batch)

    def _recomputed_batch(self) -> "_BatchAdapters | None":
        """The block a forward recomputed in the backward ran in: the recorded block whose span
        holds the graph node being backpropagated (a checkpointed forward's recompute starts from
        a node its original forward created), else the last recorded block where the last forward
        outside a backward ran in one (a nested recompute), else None (no block)."""
        node = torch._C._current_autograd_node()
        if node is not None:
            seq = node._sequence_nr()
            found = [b for b in self._recorded_batches if b.spans(seq)]
            if len({(tuple(b.names), b.batch_dim) for b in found}) > 1:
                raise RuntimeError(
                    "adapter_batch: a forward recomputed in the backward (activation checkpointing) matches blocks "
                    "with different adapter names (blocks opened in several threads at once); call backward() "
                    "inside each adapter_batch block")
            if found:
                return found[-1]
            if seq < self._dropped_before:
                raise RuntimeError(
                    f"adapter_batch: a forward recomputed in the backward (activation checkpointing) ran in a block "
                    f"older than the last {self.RECORDED_BATCHES} blocks of this layer; call backward() more often "
                    "(at least once per that many adapter_batch blocks)")
        return self._recorded_batch

    @torch.no_grad()
    def merged_weight(self, adapter: str | None = None) -> Tensor:
        """The effective dense weight ``[out, in]``: W + U·diag(d)·Vᵀ (delta) or U·diag(φ)·Vᵀ (pure),
        accumulated in float32 (float64 for float64 layers) and returned in the layer's dtype;
        with the coefficients of ``adapter`` (None: the active one)."""
        acc = torch.promote_types(self.U.dtype, torch.float32)
        d = self.coefficient_delta(adapter).to(acc)
        W = (self.U.to(acc) * d) @ self.V.to(acc).t()
        if self.weight is not None:
            W += self.weight.to(acc)
        return W.to(self.U.dtype)

    @torch.no_grad()
    def merge(self, adapter: str | None = None) -> nn.Linear:
        """An nn.Linear computing what this layer computes now (weight = :meth:`merged_weight`)."""
        W = self.merged_weight(adapter)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=W.device, dtype=W.dtype)
        linear.weight.copy_(W)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def __repr__(self) -> str:
        if not len(self.coeff_bank):  # one adapter: the repr of a layer without banks
            return f"{self._get_name()}({self.extra_repr()})"
        return super().__repr__()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"mode={self.mode}, form={self.form}, bias={self.bias is not None}, backend={self.backend}"
            + (f", adapters={self.adapter_names()}, active={self.active_adapter!r}" if len(self.coeff_bank) else "")
        )


#: letters or digits, then letters, digits, '_' or '-' (no '.', which module paths use)
_ADAPTER_NAME = re.compile(r"[^\W_][\w-]*")


@functools.cache
def _reserved_adapter_names() -> frozenset[str]:
    """Attributes of the ParameterDict that stores adapters by name (it registers each name as an
    attribute, so a name among these would shadow a method or state of the module)."""
    return frozenset(dir(nn.ParameterDict()))


def check_adapter_name(name: object) -> str:
    """An adapter name: a string of letters, digits, '_' and '-' starting with a letter or digit
    (so no '.'), and not an attribute of nn.Module / nn.ParameterDict ("to", "keys", "update",
    "forward", "training", ...). Raises ValueError naming the rule broken."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError("an adapter name must be a non-empty string of letters, digits, '_' and '-' that starts "
                         f"with a letter or digit (without '.' or spaces), got {name!r}")
    if name in _reserved_adapter_names():
        raise ValueError(f"adapter name {name!r} is reserved: it is an attribute of torch modules (nn.Module / "
                         "nn.ParameterDict, which holds adapters by name); choose another name")
    return name


# --- adapter_batch state ---------------------------------------------------------------------------
#: the adapter_batch blocks open in the current thread or asyncio task: {id(layer): batch}. A
#: ContextVar, so a block in one thread never changes the forwards of another.
_OPEN_BATCHES: contextvars.ContextVar[dict[int, "_BatchAdapters"]] = contextvars.ContextVar(
    "spectral_kernels_adapter_batches", default={})  # never mutated: every change sets a new dict
_STATE_LOCK = threading.Lock()


def open_batch(layers: Iterable[SpectralLinear], batch: "_BatchAdapters") -> None:
    """Make ``batch`` the block of ``layers`` in the calling thread/task."""
    layers = list(layers)
    batch.start_span()
    with _STATE_LOCK:
        for layer in layers:
            layer._open_batches += 1
    _OPEN_BATCHES.set({**_OPEN_BATCHES.get(), **{id(layer): batch for layer in layers}})


def close_batch(layers: Iterable[SpectralLinear]) -> None:
    """Undo :func:`open_batch` for ``layers`` in the calling thread/task."""
    layers = list(layers)
    ids = {id(layer) for layer in layers}
    for batch in {id(b): b for i, b in _OPEN_BATCHES.get().items() if i in ids}.values():
        batch.end_span()
    _OPEN_BATCHES.set({i: b for i, b in _OPEN_BATCHES.get().items() if i not in ids})
    with _STATE_LOCK:
        for layer in layers:
            layer._open_batches -= 1


class _RequiresGradHolds:
    """Reference-counted ``requires_grad=True`` holds on parameters: the first hold records the
    flag and sets it, the last release puts the recorded flag back. Blocks in several threads
    and backward passes that run after a block closed share the holds without clobbering a flag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, list] = {}  # id(param) → [param, count, flag before the first hold]

    def hold(self, params: Iterable[nn.Parameter]) -> None:
        with self._lock:
            for p in params:
                entry = self._held.get(id(p))
                if entry is None:
                    self._held[id(p)] = [p, 1, p.requires_grad]
                    p.requires_grad_(True)
                else:
                    entry[1] += 1

    def release(self, params: Iterable[nn.Parameter]) -> None:
        with self._lock:
            for p in params:
                entry = self._held[id(p)]
                entry[1] -= 1
                if entry[1] == 0:
                    del self._held[id(p)]
                    p.requires_grad_(entry[2])


#: the holds of adapter_batch blocks (and of backward passes through a block's graph)
GRAD_HOLDS = _RequiresGradHolds()


def _train_through_backward(params: list[nn.Parameter]):
    """A hook for a bank stacked from ``params`` inside a block: when the backward reaches it
    (possibly after the block closed and restored the flags), the parameters are held trainable
    until that backward ends, so their AccumulateGrad nodes, which skip a tensor that does not
    require grad, store the gradient wherever backward() is called."""
    def hook(grad: Tensor) -> None:
        GRAD_HOLDS.hold(params)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: GRAD_HOLDS.release(params))
    return hook


def _next_sequence_nr() -> int:
    """The autograd sequence number the calling thread's next graph node gets (a counter that
    every node created in a forward increments)."""
    with torch.enable_grad():
        return torch.empty(0, requires_grad=True).view(0).grad_fn._sequence_nr() + 1


class _BatchAdapters:
    """One adapter name per sample of a batch: builds the bank [n, k] of the distinct names (in
    first-appearance order) and the index, of shape [1, .., batch, .., 1] with the batch at the
    input's ``batch_dim`` (None: the first dim, refused where another leading dim has the batch's
    size too and the names differ, since a sequence-first input would then be indexed by position).

    Each layer's n coefficient parameters are looked up once per block (:meth:`coefficients_of`),
    not once per forward: at 64 adapters the lookups cost more than the bank's own arithmetic."""

    def __init__(self, names: list[str], batch_dim: int | None = None,
                 layer_names: dict[int, str] | None = None) -> None:
        self.names = list(names)
        self.batch_dim = batch_dim
        self._layer_names = dict(layer_names or {})  # id(layer) → its name in the model, for errors
        self.distinct = list(dict.fromkeys(self.names))
        row = {n: i for i, n in enumerate(self.distinct)}
        self._index = torch.tensor([row[n] for n in self.names], dtype=torch.int64)
        self._on_device: dict[torch.device, Tensor] = {}
        self._coefficients: dict[int, list[nn.Parameter]] = {}
        # the autograd sequence numbers of the graph nodes created while the block was open
        self._span = [0, None]

    def start_span(self) -> None:
        self._span = [_next_sequence_nr(), None]

    def end_span(self) -> None:
        self._span[1] = _next_sequence_nr()

    def span_end(self) -> int:
        return self._span[1] if self._span[1] is not None else _next_sequence_nr()

    def spans(self, seq: int) -> bool:
        """Whether the graph node numbered ``seq`` was created while this block was open."""
        return self._span[0] <= seq < self.span_end()

    def coefficients_of(self, layer: SpectralLinear) -> list[nn.Parameter]:
        """The distinct adapters' coefficient parameters of ``layer``, in bank-row order."""
        params = self._coefficients.get(id(layer))
        if params is None:
            named = layer.named_coefficients()
            params = self._coefficients[id(layer)] = [named[n] for n in self.distinct]
        return params

    def _batch_dim_of(self, x: Tensor, layer: SpectralLinear) -> int:
        n, lead = len(self.names), tuple(x.shape[:-1])
        name = self._layer_names.get(id(layer))
        who = f"layer {name!r}" if name is not None else "a layer"
        if self.batch_dim is not None:
            if not self.batch_dim < len(lead) or lead[self.batch_dim] != n:
                raise ValueError(
                    f"adapter_batch was given {n} adapter names (one per sample) and batch_dim={self.batch_dim}, but "
                    f"{who} got an input of shape {tuple(x.shape)} whose dim {self.batch_dim} is not the batch of {n} "
                    "(batch_dim counts the input's leading dims, the last one being the features)")
            return self.batch_dim
        if not lead or lead[0] != n:
            other = [i for i, size in enumerate(lead) if size == n]
            hint = f"; if dim {other[0]} is the batch (a model that is not batch-first), pass batch_dim={other[0]}" \
                if other else ""
            if not other and lead and lead[0] % n == 0:
                hint = (f"; its first dim {lead[0]} is a multiple of {n}: a model that flattens [batch, seq] into one dim "
                        "before this layer (OPT's fc1/fc2 do) cannot run one adapter per sample there; adapt layers "
                        "that see the batch dim, or run each adapter's samples as their own batch")
            raise ValueError(
                f"adapter_batch was given {n} adapter names (one per sample), but {who} got an input of shape "
                f"{tuple(x.shape)} whose first dim is not the batch of {n}{hint}")
        if len(self.distinct) > 1 and n in lead[1:]:
            dims = [i for i, size in enumerate(lead) if size == n]
            raise ValueError(
                f"adapter_batch: ambiguous layout: {who} got an input of shape {tuple(x.shape)} whose dims {dims} "
                f"all have the batch size {n}, so the batch dim cannot be told from the sequence dim; pass "
                "batch_dim= (0 for batch-first inputs [batch, seq, in], 1 for sequence-first [seq, batch, in])")
        return 0

    def bank_and_index(self, layer: SpectralLinear, x: Tensor, *, recompute: bool = False) -> tuple[Tensor, Tensor]:
        """The bank [n, k] (in x's dtype) and the index for ``layer``'s input x. ``recompute``: the
        forward is recomputed inside a backward after the block closed (activation checkpointing):
        the coefficients are held trainable until that backward ends, so the recomputed graph
        reaches them."""
        dim = self._batch_dim_of(x, layer)
        params = self.coefficients_of(layer)
        if recompute and torch.is_grad_enabled():
            GRAD_HOLDS.hold(params)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: GRAD_HOLDS.release(params))
        stacked = torch.stack(params)
        if stacked.requires_grad:
            stacked.register_hook(_train_through_backward(params))
        bank = layer._delta_of(stacked).to(x.dtype)
        index = self._on_device.get(x.device)
        if index is None:
            index = self._on_device[x.device] = self._index.to(x.device)
        shape = [1] * (x.dim() - 1)
        shape[dim] = -1
        return bank, index.view(shape)


def _top_singular_triplets(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` (U [out, k], s [k], V [in, k]) of W by :func:`truncated_svd` (float32, or
    float64 for float64 weights; accurate to its documented contract)."""
    if not torch.isfinite(W).all():
        raise ValueError("linear.weight holds NaN or Inf; cannot take its SVD")
    U, s, V = truncated_svd(W.detach(), rank)
    return U, s, V


def _check_factors(svd, W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Validate precomputed factors (U [out, r], s [r], V [in, r], r ≥ rank); return the top rank."""
    if not (isinstance(svd, (tuple, list)) and len(svd) == 3 and all(isinstance(t, Tensor) for t in svd)):
        raise TypeError("svd must be a tuple of tensors (U [out, r], s [r], V [in, r])")
    U, s, V = svd
    out_f, in_f = W.shape
    if U.dim() != 2 or s.dim() != 1 or V.dim() != 2 or U.shape[0] != out_f or V.shape[0] != in_f \
            or not (U.shape[1] == s.shape[0] == V.shape[1]) or s.shape[0] < rank:
        raise ValueError(
            f"svd factors must be U [{out_f}, r], s [r], V [{in_f}, r] with r >= rank = {rank}; "
            f"got U {tuple(U.shape)}, s {tuple(s.shape)}, V {tuple(V.shape)}"
        )
    return U[:, :rank], s[:rank], V[:, :rank]
