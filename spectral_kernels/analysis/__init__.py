"""Spectral analysis of fine-tuning (DESIGN.md §7): how the singular values and vectors of each weight
moved from a base model to one or more fine-tuned ones.

    from spectral_kernels.analysis import compare, shared_basis, load_state_dict
    reports = compare(load_state_dict("base/"), load_state_dict("tuned/"), k=16)
    reports["encoder.layer.0.attention.self.query.weight"].sv_ratio        # s'ᵢ / sᵢ, i < k

The plots (:mod:`spectral_kernels.analysis.report`) need matplotlib: ``pip install spectral-kernels[analysis]``.
"""
from spectral_kernels.analysis.comparison import (
    LayerReport,
    SharedBasisReport,
    compare,
    layer_type,
    matching_weights,
    shared_basis,
    similarity_curve,
    subspace_similarity,
)
from spectral_kernels.analysis.io import load_state_dict, load_tuned
from spectral_kernels.analysis.report import shared_summary, summarize, to_json

__all__ = [
    "LayerReport",
    "SharedBasisReport",
    "compare",
    "layer_type",
    "load_state_dict",
    "load_tuned",
    "matching_weights",
    "shared_basis",
    "shared_summary",
    "similarity_curve",
    "subspace_similarity",
    "summarize",
    "to_json",
]
