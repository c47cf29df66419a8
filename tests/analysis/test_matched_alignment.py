"""Alignment figures that agree with the subspace similarity: singular values reordered by training
("scale" mode lifting s₂ above s₁) and near-equal singular values (vectors not individually defined)
are matched or grouped, marked in the summary and explained in a footnote."""
import math

import pytest
import torch

from spectral_kernels.analysis import compare, summarize
from spectral_kernels.analysis.comparison import matched_alignment, near_equal_groups
from tests.analysis.test_compare import _build, _orth, _rot

M, N, K = 40, 30, 6


def _spectrum(head):
    rest = 6.0 * 0.8 ** torch.arange(N - len(head), dtype=torch.float64)
    return torch.cat([torch.tensor(head, dtype=torch.float64), rest])


def _sd(W):
    return {"w": W.float()}


def test_reordered_singular_values_are_matched_not_compared_by_index():
    U, V = _orth(M, 0), _orth(N, 1)
    s = _spectrum([10.0, 9.0, 8.0])
    c = torch.ones_like(s)
    c[:2] = torch.tensor([0.85, 1.2])  # "scale" training: s₁' = 8.5 < s₂' = 10.8, the first two swap
    r = compare(_sd(_build(U, s, V)), _sd(_build(U, s * c, V)), k=K)["w"]
    assert float(r.alignment_u[0]) < 1e-4, "index by index u₁ meets the tuned model's other vector"
    assert r.subspace_similarity == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(r.matched_alignment_u, torch.ones(K, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.matched_alignment_v, torch.ones(K, dtype=torch.float64), atol=1e-5, rtol=0)
    assert r.matched_index_u[:3].tolist() == [1, 0, 2]
    assert r.group_size_u.tolist() == [1] * K
    md = summarize({"w": r})
    row = next(line for line in md.splitlines() if line.startswith("| w | 40×30"))
    assert "1.000 →u'2" in row and "0.000" not in row
    assert "training reordered the singular values" in md


def test_near_equal_singular_values_are_aligned_as_a_group():
    U, V = _orth(M, 2), _orth(N, 3)
    s = _spectrum([10.0, 9.96, 8.0])  # s₁, s₂ within 0.4 %: u₁, u₂ individually ill-defined
    theta = 0.6
    W2 = _build(_rot(U, 0, 1, theta), s, _rot(V, 0, 1, theta))  # the pair turned within its own plane
    r = compare(_sd(_build(U, s, V)), _sd(W2), k=K)["w"]
    assert float(r.alignment_u[0]) == pytest.approx(math.cos(theta), abs=1e-4)
    assert r.subspace_similarity == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(r.matched_alignment_u[:2], torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert r.group_size_u.tolist() == [2, 2, 1, 1, 1, 1]
    md = summarize({"w": r})
    row = next(line for line in md.splitlines() if line.startswith("| w | 40×30"))
    assert "1.000†" in row
    assert "†: s₁ is within 1% of a neighbouring singular value" in md
    # a stricter tolerance treats the pair as two vectors: the rotation shows again
    strict = compare(_sd(_build(U, s, V)), _sd(W2), k=K, gap_tol=1e-3)["w"]
    assert float(strict.matched_alignment_u[0]) == pytest.approx(math.cos(theta), abs=1e-4)
    assert strict.group_size_u.tolist() == [1] * K


def test_a_real_rotation_of_well_separated_vectors_still_shows():
    U, V = _orth(M, 4), _orth(N, 5)
    s = _spectrum([10.0, 8.0, 6.5])
    theta = 0.5
    r = compare(_sd(_build(U, s, V)), _sd(_build(_rot(U, 0, 1, theta), s, V)), k=K)["w"]
    assert float(r.matched_alignment_u[0]) == pytest.approx(math.cos(theta), abs=1e-4)
    assert r.group_size_u.tolist() == [1] * K
    row = next(line for line in summarize({"w": r}).splitlines() if line.startswith("| w | 40×30"))
    assert "†" not in row and "→" not in row


def test_groups_chain_and_matching_on_random_bases():
    S = torch.tensor([10.0, 9.95, 9.9, 7.0, 6.99, 1.0], dtype=torch.float64)
    assert near_equal_groups(S, 1e-2).tolist() == [0, 0, 0, 1, 1, 2]
    assert near_equal_groups(S, 0.0).tolist() == [0, 1, 2, 3, 4, 5]
    A, B = _orth(12, 6)[:, :4], _orth(12, 7)[:, :4]
    SA = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    align, index, size = matched_alignment(A, SA, B, SA, 0.0)
    M_ = (A.T @ B).abs()
    torch.testing.assert_close(align, M_.max(1).values)
    assert index.tolist() == M_.argmax(1).tolist() and size.tolist() == [1, 1, 1, 1]
    # one group on both sides: each vector's projection onto the whole span
    align, _, size = matched_alignment(A, torch.ones(4, dtype=torch.float64), B, torch.ones(4, dtype=torch.float64), 0.1)
    torch.testing.assert_close(align, M_.square().sum(1).sqrt())
    assert size.tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.01", True])
def test_gap_tol_is_checked(bad):
    W = _build(_orth(M, 0), _spectrum([3.0]), _orth(N, 1))
    with pytest.raises(ValueError, match="gap_tol must be a number >= 0"):
        compare(_sd(W), _sd(W), k=2, gap_tol=bad)


def test_json_carries_both_figures():
    import json

    from spectral_kernels.analysis import to_json

    W = _build(_orth(M, 0), _spectrum([3.0, 2.0]), _orth(N, 1))
    data = json.loads(to_json(compare(_sd(W), _sd(W * 1.1), k=3)))["w"]
    for key in ("alignment", "matched_alignment", "matched_index", "group_size", "matched_alignment_v"):
        assert len(data[key]) == 3, key
    assert data["gap_tol"] == 0.01


def test_analyze_command_marks_and_explains_a_reordering(tmp_path, capsys):
    from safetensors.torch import save_file

    from spectral_kernels.cli import main

    U, V = _orth(M, 8), _orth(N, 9)
    s = _spectrum([10.0, 9.0, 8.0])
    c = torch.ones_like(s)
    c[1] = 1.3  # s₂ lifted past s₁
    save_file(_sd(_build(U, s, V)), str(tmp_path / "base.safetensors"))
    save_file(_sd(_build(U, s * c, V)), str(tmp_path / "tuned.safetensors"))
    argv = [str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--k", "4", "--no-plots",
            "--no-progress"]
    assert main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "1.000 →u'2" in md and "training reordered the singular values" in md
    assert main(["analyze", *argv, "--out", str(tmp_path / "bad"), "--gap-tol", "-1"]) == 2
    assert "gap_tol must be a number >= 0" in capsys.readouterr().err
