"""The analysis on planted changes: known amplification of the top singular values, known rotations
of singular vectors (inside and out of the top-k subspace), cross-task sharing."""
import math

import pytest
import torch

from spectral_kernels.analysis import compare, matching_weights, shared_basis, similarity_curve, subspace_similarity

M, N, K = 72, 48, 8


def _orth(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _planted(seed=0):
    """W = U diag(s) Vᵀ with well separated singular values (ratio 0.8 between neighbours)."""
    U, V = _orth(M, seed), _orth(N, seed + 100)
    s = 10.0 * 0.8 ** torch.arange(N, dtype=torch.float64)
    return U, s, V


def _build(U, s, V):
    return (U[:, : s.shape[0]] * s) @ V[:, : s.shape[0]].T


def _rot(Q, i, j, theta):
    """Q with columns i, j rotated by theta in their plane: q_i' = cos θ q_i + sin θ q_j."""
    Q = Q.clone()
    qi, qj = Q[:, i].clone(), Q[:, j].clone()
    Q[:, i] = math.cos(theta) * qi + math.sin(theta) * qj
    Q[:, j] = -math.sin(theta) * qi + math.cos(theta) * qj
    return Q


def _sd(W):
    return {"layer.0.weight": W.float(), "layer.0.bias": torch.zeros(W.shape[0])}


def test_amplified_top_singular_values_are_reported_by_index():
    U, s, V = _planted()
    gain = torch.ones_like(s)
    gain[:3] = torch.tensor([2.0, 1.5, 1.25])  # stays descending: 20 > 12 > 8 > 5.12
    r = compare(_sd(_build(U, s, V)), _sd(_build(U, s * gain, V)), k=K)["layer.0.weight"]
    assert r.k == K and r.shape == (M, N)
    torch.testing.assert_close(r.sv_ratio, gain[:K], atol=1e-5, rtol=0)
    torch.testing.assert_close(r.alignment, torch.ones(K, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.alignment_v, torch.ones(K, dtype=torch.float64), atol=1e-5, rtol=0)
    assert r.subspace_similarity == pytest.approx(1, abs=1e-5)
    assert r.subspace_similarity_v == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(r.s_base, s[:K], atol=1e-4, rtol=1e-5)
    expected = float((_build(U, s * gain, V) - _build(U, s, V)).norm() / _build(U, s, V).norm())
    assert r.relative_change == pytest.approx(expected, rel=1e-4)


def test_rotation_inside_the_top_k_keeps_the_subspace_but_not_the_vectors():
    U, s, V = _planted(1)
    theta = 0.5
    r = compare(_sd(_build(U, s, V)), _sd(_build(_rot(U, 0, 1, theta), s, V)), k=K)["layer.0.weight"]
    c = math.cos(theta)
    torch.testing.assert_close(r.alignment[:2], torch.tensor([c, c], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.alignment[2:], torch.ones(K - 2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.alignment_v, torch.ones(K, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.sv_ratio, torch.ones(K, dtype=torch.float64), atol=1e-5, rtol=0)
    assert r.subspace_similarity == pytest.approx(1, abs=1e-5)
    # j = 1: only u1 compared, cos²θ; from j = 2 on the plane of the rotation is inside
    assert float(r.similarity_by_k_u[0]) == pytest.approx(c * c, abs=1e-5)
    torch.testing.assert_close(r.similarity_by_k_u[1:], torch.ones(K - 1, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["U", "V"])
def test_rotation_out_of_the_top_k_lowers_the_subspace_similarity(side):
    U, s, V = _planted(2)
    theta = 0.7
    out = N + 3 if side == "U" else N - 2  # a direction the top-k (and, for U, W itself) does not use
    if side == "U":
        W2 = _build(_rot(U, 0, out, theta), s, V)
    else:
        W2 = _build(U, s, _rot(V, 0, out, theta))
    r = compare(_sd(_build(U, s, V)), _sd(W2), k=K)["layer.0.weight"]
    c2 = math.cos(theta) ** 2
    moved, kept = (r.alignment_u, r.alignment_v) if side == "U" else (r.alignment_v, r.alignment_u)
    sim_moved = r.subspace_similarity if side == "U" else r.subspace_similarity_v
    sim_kept = r.subspace_similarity_v if side == "U" else r.subspace_similarity
    assert float(moved[0]) == pytest.approx(math.cos(theta), abs=1e-5)
    torch.testing.assert_close(moved[1:], torch.ones(K - 1, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(kept, torch.ones(K, dtype=torch.float64), atol=1e-5, rtol=0)
    assert sim_moved == pytest.approx((K - 1 + c2) / K, abs=1e-5)
    assert sim_kept == pytest.approx(1, abs=1e-5)


def test_unrelated_matrices_sit_near_chance():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(200, 150, generator=g), torch.randn(200, 150, generator=g)
    r = compare({"w": a}, {"w": b}, k=10)["w"]
    assert r.chance_u == pytest.approx(10 / 200) and r.chance_v == pytest.approx(10 / 150)
    assert r.subspace_similarity < 4 * r.chance_u
    assert r.subspace_similarity_v < 4 * r.chance_v


def test_similarity_helpers():
    Q = _orth(20, 4)
    assert subspace_similarity(Q[:, :5], Q[:, :5]) == pytest.approx(1.0)
    assert subspace_similarity(Q[:, :5], Q[:, 5:10]) == pytest.approx(0.0, abs=1e-12)
    curve = similarity_curve(Q[:, :4], Q[:, [0, 1, 5, 6]])
    torch.testing.assert_close(curve, torch.tensor([1.0, 1.0, 2 / 3, 0.5], dtype=torch.float64))


def test_selection_of_weights_and_k_clamping():
    g = torch.Generator().manual_seed(5)
    base = {"enc.0.w": torch.randn(12, 6, generator=g), "enc.1.w": torch.randn(9, 9, generator=g),
            "vec": torch.randn(7, generator=g), "ids": torch.arange(12).reshape(3, 4),
            "only_base": torch.randn(4, 4, generator=g), "changed_shape": torch.randn(5, 4, generator=g)}
    tuned = {k: (v * 2 if v.dtype.is_floating_point else v) for k, v in base.items() if k != "only_base"}
    tuned["changed_shape"] = torch.randn(6, 4, generator=g)
    reps = compare(base, tuned, k=8)
    assert set(reps) == {"enc.0.w", "enc.1.w"}
    assert reps["enc.0.w"].k == 6 and reps["enc.1.w"].k == 8
    torch.testing.assert_close(reps["enc.0.w"].sv_ratio, torch.full((6,), 2.0, dtype=torch.float64), atol=1e-5, rtol=0)
    assert set(compare(base, tuned, k=2, include=r"enc\.1")) == {"enc.1.w"}
    assert set(compare(base, tuned, k=2, exclude=r"enc\.1")) == {"enc.0.w"}
    with pytest.raises(ValueError, match="k must be a positive integer"):
        compare(base, tuned, k=0)
    with pytest.raises(ValueError, match="no 2-D weight"):
        compare(base, {"x": torch.randn(3, 3)}, k=2)


def test_names_match_across_a_task_head_prefix():
    g = torch.Generator().manual_seed(6)
    base = {"encoder.layer.0.query.weight": torch.randn(10, 10, generator=g),
            "embeddings.word.weight": torch.randn(30, 10, generator=g)}
    tuned = {"bert." + k: v.clone() for k, v in base.items()}
    tuned["classifier.weight"] = torch.randn(2, 10, generator=g)
    pairs = matching_weights(base, tuned)
    assert pairs == {k: (k, "bert." + k) for k in base}
    back = matching_weights(tuned, base)
    assert back == {"bert." + k: ("bert." + k, k) for k in base}
    r = compare(base, tuned, k=3)
    assert all(float(x.sv_ratio.sub(1).abs().max()) < 1e-5 for x in r.values())


def test_shared_basis_on_planted_tasks():
    U, s, V = _planted(7)
    W = _build(U, s, V)
    gain_a = torch.ones_like(s); gain_a[:2] = 2.0
    gain_b = torch.ones_like(s); gain_b[:2] = 1.5
    task_a = _build(U, s * gain_a, V)                       # amplifies the top 2: same basis
    task_b = _build(U, s * gain_b, V)                       # amplifies the same top 2 by another gain
    task_c = _build(_rot(U, 0, N + 1, 0.6), s, V)           # re-orients u1 out of the top-k
    rep = shared_basis(_sd(W), [_sd(task_a), _sd(task_b), _sd(task_c)], k=K)["layer.0.weight"]
    c2 = math.cos(0.6) ** 2
    torch.testing.assert_close(rep.base_similarity_u, torch.tensor([1, 1, (K - 1 + c2) / K], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(rep.base_similarity_v, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(rep.pairwise_u[0, 1]) == pytest.approx(1, abs=1e-5)
    assert float(rep.pairwise_u[0, 2]) == pytest.approx((K - 1 + c2) / K, abs=1e-5)
    # the updates of a and b are both rank 2 in span(u1, u2): their top-2 subspaces coincide
    rep2 = shared_basis(_sd(W), [_sd(task_a), _sd(task_b)], k=2)["layer.0.weight"]
    assert float(rep2.delta_pairwise_u[0, 1]) == pytest.approx(1, abs=1e-5)
    assert float(rep2.delta_pairwise_v[0, 1]) == pytest.approx(1, abs=1e-5)
    assert rep.chance_u == pytest.approx(K / M)
    # an unchanged model has no update subspace: NaN, not an error
    rep3 = shared_basis(_sd(W), [_sd(W), _sd(task_a)], k=2)["layer.0.weight"]
    assert math.isnan(float(rep3.delta_pairwise_u[0, 1])) and float(rep3.delta_norms[0]) == 0
    with pytest.raises(ValueError, match="sequence"):
        shared_basis(_sd(W), _sd(task_a), k=2)
