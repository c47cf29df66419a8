"""SpectralConfig: which layers of a model to adapt, and how.

The fields mirror peft's LoraConfig where the meaning is the same (``target_modules``,
``exclude_modules``, ``modules_to_save``, ``lora_alpha``) so that a peft user can read a config at a
glance; the spectral fields (``rank``, ``mode``, ``form``) are those of
:class:`spectral_kernels.nn.SpectralLinear`.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

MODES = ("scale", "shift", "speclora")
FORMS = ("auto", "delta", "pure")
SVD_METHODS = ("auto", "exact", "gram", "randomized")
#: target_modules value meaning every nn.Linear / Conv1D except the model's output embedding (as in peft).
ALL_LINEAR = "all-linear"


@dataclass
class SpectralConfig:
    """How :func:`spectral_kernels.tuning.adapt` rewrites a model.

    Args:
        target_modules: which layers to adapt, matched against the qualified module names of
            ``model.named_modules()``. A list: an entry matches a name equal to it or ending in
            ``"." + entry`` (``["query", "value"]`` matches ``encoder.layer.0.attention.self.query``).
            A string: a regular expression that must match the whole name (``re.fullmatch``), as
            in peft; ``"all-linear"`` takes every nn.Linear / Conv1D except the output embedding
            (``model.get_output_embeddings()``) and those inside ``modules_to_save``.
            Every list entry (and the regex) must match at least one module, and every matched module
            must be an nn.Linear or a transformers Conv1D.
        exclude_modules: names dropped from the matches, with the same rules (no match is not an
            error here).
        rank: k, the number of leading singular directions tuned per layer: an int
            (1 ≤ k ≤ min(in, out) for every target), ``"full"`` (k = min(in, out)), or a float in
            (0, 1] (k = max(1, round(rank·min(in, out))) per layer, Python's round: half to even).
        mode: ``"scale"`` (φ = s ⊙ c, c₀ = 1), ``"shift"`` (φ = s + c, c₀ = 0), or ``"speclora"``
            ("scale" on the top k plus a LoRA pair of rank ``lora_rank``).
        form: ``"delta"`` keeps the frozen weight W and adds U·diag(φ − s)·Vᵀ (an exact identity at
            initialisation); ``"pure"`` drops W and computes U·diag(φ)·Vᵀ (only sensible at full rank);
            ``"auto"`` (default) is pure for ``mode="scale", rank="full"`` and delta otherwise.
        lora_rank, lora_alpha: r and α of the LoRA pair in "speclora" mode; the LoRA term is
            (α / r)·B·A with A [r, in] (kaiming-uniform, as peft) and B [out, r] = 0 at start.
        train_bias: make the adapted layers' biases trainable (saved in the adapter then).
        modules_to_save: modules (names or name suffixes, as target_modules lists) whose parameters
            stay trainable and are saved in the adapter, e.g. ``["classifier"]``.
        svd_method, svd_oversample, svd_n_iter, svd_tol, svd_seed: options of
            :func:`spectral_kernels.ops.truncated_svd.batched_truncated_svd`, which computes the
            top-k factors of every target in one pass grouped by shape.
        svd_cache_dir: on-disk cache of those factors (keyed by a hash of each weight), or None.
        progress: show the SVD progress bar (None: when stderr is a terminal).
        backend: backend of the spectral_linear op in every adapted layer.

    Choosing a mode and a learning rate (AdamW, measured on MiniLM-L6 and two text tasks with a
    3-value sweep and 3 seeds; docs/FINDINGS.md, docs/guide.md "Which mode?"):

    - ``"scale"``: lr ≈ 5e-3 (2e-3 … 1e-2). A step moves each singular value by ≈ lr *relative*
      to itself. Top-16 trains ~0.006 % of a BERT's parameters: 4 points under LoRA on the harder
      task at LoRA's 300 steps, 2.5 under at 600 (its loss still falling): train it longer.
    - ``"shift"``: lr ≈ 1e-2 (5e-3 … 2e-2): a step moves a singular value by ≈ lr in absolute
      terms, so it wants a higher lr than "scale".
    - ``rank="full"``: "scale" at lr ≈ 5e-3, "shift" at ≈ 1e-2 (both best at the top of the grid
      measured); 0.1 % of the parameters, within noise of LoRA on one task, ~3 points under on the
      other.
    - ``"speclora"``: the LoRA pair sets the learning rate: use LoRA's (5e-4 … 1e-3). At 2e-3 the
      pair moves the weights by ~20 % of their norm in 300 steps and runs collapsed to chance.
      For the coefficients to move as much as in "scale", give them their own learning rate with
      :func:`spectral_kernels.param_groups` (``coeff_lr_ratio=5``); measured, that changed
      accuracy by less than the noise.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    rank: int | float | str = 8
    mode: str = "scale"
    form: str = "auto"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    train_bias: bool = False
    modules_to_save: list[str] | None = None
    svd_method: str = "auto"
    svd_oversample: int | None = None
    svd_n_iter: int | None = None
    svd_tol: float | None = None
    svd_seed: int = 0
    svd_cache_dir: str | None = None
    progress: bool | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            raise ValueError("SpectralConfig: target_modules is required (names, name suffixes, a regex or 'all-linear')")
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = list(_check_patterns("modules_to_save", list(self.modules_to_save)))
        _choice("mode", self.mode, MODES)
        _choice("form", self.form, FORMS)
        _choice("svd_method", self.svd_method, SVD_METHODS)
        r = self.rank
        if isinstance(r, str):
            if r != "full":
                raise ValueError(f"SpectralConfig: rank must be an int, 'full' or a fraction in (0, 1]; got {r!r}")
        elif isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise ValueError(f"SpectralConfig: rank must be an int, 'full' or a fraction in (0, 1]; got {r!r}")
        elif isinstance(r, numbers.Integral):
            if r < 1:
                raise ValueError(f"SpectralConfig: an integer rank must be >= 1; got {r}")
            self.rank = int(r)
        else:
            if not (0.0 < r <= 1.0) or math.isnan(r):
                raise ValueError(f"SpectralConfig: a fractional rank must lie in (0, 1]; got {r}")
            self.rank = float(r)
        if self.mode == "speclora":
            if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, numbers.Integral) or self.lora_rank < 1:
                raise ValueError(f"SpectralConfig: lora_rank must be an int >= 1; got {self.lora_rank!r}")
            if not isinstance(self.lora_alpha, numbers.Real) or not math.isfinite(self.lora_alpha):
                raise ValueError(f"SpectralConfig: lora_alpha must be a finite number; got {self.lora_alpha!r}")
            if self.form == "pure":
                raise ValueError("SpectralConfig: mode='speclora' needs form='delta' (or 'auto'); the LoRA term "
                                 "is added to the frozen weight")
        from spectral_kernels.backends import BACKENDS

        _choice("backend", self.backend, BACKENDS)

    # --- resolved values ---------------------------------------------------------------------------
    def rank_for(self, in_features: int, out_features: int) -> int:
        """k for a layer of this shape (not clamped: a too large int is reported by the caller)."""
        limit = min(in_features, out_features)
        if self.rank == "full":
            return limit
        if isinstance(self.rank, float):
            return max(1, min(limit, round(self.rank * limit)))
        return self.rank

    def form_for(self, k: int, in_features: int, out_features: int) -> str:
        """The layer form: "pure" only when asked, or for "auto" with mode "scale" at full rank."""
        if self.form != "auto":
            return self.form
        return "pure" if self.mode == "scale" and self.rank == "full" else "delta"

    # --- serialisation (the adapter file's metadata) ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpectralConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SpectralConfig: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SpectralConfig":
        return cls.from_dict(json.loads(text))


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"SpectralConfig: {name} must be one of {tuple(choices)}, got {value!r}")


def _check_patterns(name: str, value: object) -> str | list[str]:
    if isinstance(value, str):
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"SpectralConfig: {name} {value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        if not value:
            raise ValueError(f"SpectralConfig: {name} is empty")
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"SpectralConfig: {name} must be a regex string or a list of non-empty names; got {value!r}")


def name_matches(name: str, pattern: str | list[str]) -> bool:
    """peft's rule: a regex string must match the whole name; a list entry matches the name or a suffix
    after a dot."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)
