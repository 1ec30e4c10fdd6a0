"""The NEq equations against hand-computed values."""

import math

import pytest
import torch

from neq_hf.equilibrium import at_equilibrium, cosine_from_sums, velocity

NAN = float("nan")


def sums(a, b):
    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)


def test_cosine_matches_definition():
    prev = [[1.0, 0.0], [1.0, 2.0], [3.0, -1.0]]
    cur = [[0.0, 1.0], [2.0, 4.0], [-3.0, 1.0]]
    phi = cosine_from_sums(*sums(prev, cur))
    assert phi.dtype == torch.float32
    torch.testing.assert_close(phi, torch.tensor([0.0, 1.0, -1.0]))
    # 1*1 + 2*0 over sqrt(5)*1
    assert cosine_from_sums(*sums([1.0, 2.0], [1.0, 0.0])).item() == pytest.approx(1 / math.sqrt(5))


def test_cosine_with_zero_vectors_is_defined():
    phi = cosine_from_sums(*sums([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(phi, torch.tensor([1.0, 0.0, 0.0]))
    assert not torch.isnan(phi).any()


def test_cosine_non_finite_is_nan():
    phi = cosine_from_sums(torch.tensor([NAN, math.inf, 1.0]), torch.tensor([1.0, 1.0, math.inf]), torch.ones(3))
    assert torch.isnan(phi).all()


def test_cosine_is_computed_in_float32_from_half_inputs():
    dot, a, b = sums([[1e-3] * 8], [[1e-3] * 8])
    phi = cosine_from_sums(dot.half(), a.half(), b.half())
    assert phi.dtype == torch.float32


def test_velocity_sequence_by_hand():
    mu = 0.5
    phis = [torch.tensor([0.90]), torch.tensor([0.95]), torch.tensor([0.97]), torch.tensor([0.975])]
    phi_prev, v = torch.tensor([NAN]), torch.tensor([NAN])
    expected = [NAN, 0.05, 0.02 - 0.5 * 0.05, 0.005 - 0.5 * (0.02 - 0.5 * 0.05)]
    for phi, want in zip(phis, expected):
        v = velocity(phi, phi_prev, v, mu)
        phi_prev = phi
        if math.isnan(want):
            assert torch.isnan(v).all()
        else:
            assert v.item() == pytest.approx(want, abs=1e-6)


def test_velocity_restarts_after_non_finite_phi():
    v = velocity(torch.tensor([0.9]), torch.tensor([NAN]), torch.tensor([0.3]), 0.5)
    assert torch.isnan(v).all()
    # previous velocity undefined: v = dphi
    assert velocity(torch.tensor([0.9]), torch.tensor([0.8]), torch.tensor([NAN]), 0.5).item() == pytest.approx(0.1)


def test_equilibrium_decision():
    v = torch.tensor([0.0, 5e-4, -5e-4, 1e-3, -2e-3, NAN, math.inf])
    assert at_equilibrium(v, 1e-3).tolist() == [True, True, True, False, False, False, False]
    assert not at_equilibrium(v, 0.0).any()
