"""The NEq equations, tensor in, tensor out.

For a unit i with outputs y_i^t on the held-out split at check t (paper, Sec. 3):

    phi_i^t  = cos(y_i^t, y_i^{t-1})                  similarity with the previous check
    dphi_i^t = phi_i^t - phi_i^{t-1}                  variation of the similarity
    v_i^t    = dphi_i^t - mu * v_i^{t-1}              velocity
    frozen   = |v_i^t| < eps                          equilibrium

The paper's rule is absolute: eps is compared with a velocity whose scale depends on the learning rate, the check
interval and the method (LoRA barely moves unit outputs, so |v| < 1e-3 holds for nearly every unit at once). The
relative rule measures the same quantities in units of what the rest of the network does at the same check:

    m_{l,k}^t = median_{i in layer l, kind k} (1 - phi_i^t)    the typical change of layer l's units of kind k
    s_k^t     = max_l m_{l,k}^t                               the change of the layer that moves most, now
    frozen    = |v_i^t| < min(eps_rel * s_k^t, eps_max)  and  (1 - phi_i^t) < eps_rel * s_k^t

A unit is at rest when it moves (and accelerates) less than a fraction eps_rel of the typical unit of the
fastest-moving layer at the same check. Multiplying every (1 - phi) of a check by a constant (a smaller learning
rate, LoRA, a longer check interval, learning-rate decay late in a run) multiplies v and s by the same constant and
leaves every decision unchanged. Because s is taken at the same check rather than over the run, a run whose outputs
all slow down together (a decaying learning rate, a converged task) does not read as one at rest: what freezes is
what moves much less than the rest of the network. The layer that defines s never has half of its units below
eps_rel * s (its median is s), so with ``layer_threshold >= 0.5`` at least that layer and everything above it keep
training: the rule cannot freeze a whole model. A frozen bottom prefix has 1 - phi = 0 exactly and does not lower s,
which is a maximum.

The cap eps_max (``NEqConfig.eps_relative_max``, 3e-3 by default; 0 removes it) bounds the velocity threshold by the
paper's kind of absolute limit, three times the paper's eps. It can only make the rule stricter, never looser, so
it cannot bring back the collapse of the absolute rule (LoRA, a small learning rate: there eps_rel * s is far below it
and the rule is the relative one). It binds where the network moves fast: at twice the GLUE grid's learning rate,
eps_rel * s was 4e-3 to 1.7e-2 at the checks where the bottom layer froze, at the grid's learning rate about 2e-3, and
the relative rule alone then froze the bottom layers in the middle of bursts of learning of the top and cost 0.8
points of accuracy over ten seeds (README, "Does the default hold in every regime?"). It is not interval-free: checks
further apart see larger changes, so it also binds in longer runs (fewer units frozen there).

A unit already frozen stays frozen while ``(1 - phi_i^t) < eps_rel * s_k^t`` (its output does not move), whatever its
velocity: when a unit freezes, its own updates stop, so its phi jumps towards 1 and the next velocities measure that
jump, not a change of the unit. Re-deciding frozen units with the full rule released them at the next checks (the
more so as s shrinks with the learning rate): on the GLUE grid whole bottom layers froze and thawed at every other
check, and the fraction frozen fell towards the end of runs. A frozen unit is released when its output moves again,
through the layers below it. The absolute rule keeps the paper's re-decision by ``|v| < eps``.

The second condition keeps a unit that moves at a steady rate (v ~ 0 because phi is stationary,
while 1 - phi is as large as the fastest layer's) from counting as at rest. The first version of this rule took s as
the largest median change seen so far in the run; as outputs slowed with the learning rate and the frozen prefix
grew, every layer fell below that peak one after another and whole models froze by mid-run
(`benchmarks/results/regimes/`).

Checks are numbered t = 0 (the reference, taken before training: outputs only), 1, 2, ... A quantity that does not
exist yet is NaN: ``phi`` exists from t = 1, ``dphi`` and ``v`` from t = 2, where ``v^1`` is taken as 0. A unit whose
outputs were not finite at some check gets a NaN ``phi`` there, is not frozen, and restarts the same way (its velocity
exists again two finite checks later). So no decision is possible before t = 2.

The cosine is built from three sums that add up across data shards: ``dot = <y^t, y^{t-1}>``, ``sq_cur = |y^t|^2``
and ``sq_prev = |y^{t-1}|^2``. With a zero vector it is defined without NaN: 1 when both vectors are zero (a dead unit
did not change), 0 when exactly one is. Everything is computed in float32 (or wider).

What y_i^t holds, and where it deviates from the paper on purpose. The paper's y_i^t keeps every output position of
every held-out sample. By default (`NEqConfig.token_pooling="mean"`) each sample contributes one position instead: the
mean of the unit's outputs over the sample's real (non-padding) tokens, so y_i^t has samples x head_dim entries for a
head and one entry per sample for an MLP neuron. This bounds the reference's memory by the number of samples rather
than of tokens, but a unit whose per-token pattern changes under an unchanged mean counts as unchanged: against the
per-token vectors it changes 6-20% of decisions on a tiny BERT, mostly of MLP neurons, and on MiniLM fine-tuned on
SST-2 8% of the heads' and 13% of the neurons' decisions with the absolute rule, 3% with the relative rule
(`benchmarks/results/holdout_size.md`). `token_pooling="none"` keeps every real token's output (padding excluded), the
paper's reading, at ~tokens-per-sample times the memory. The equations above are unchanged either way. Two other
deliberate differences concern what a unit is, not the equations: attention heads are units too (the paper's units
are neurons or channels), and a unit also owns the column of the attention output projection or MLP down projection
that reads its output, besides its incoming rows and biases (the paper's neuron owns only its incoming weights and
bias), so that a layer whose units are all frozen has nothing left to train and backward can stop there.
"""

from __future__ import annotations

import torch


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cosine_from_sums(dot: torch.Tensor, sq_prev: torch.Tensor, sq_cur: torch.Tensor) -> torch.Tensor:
    """phi = dot / (|y_prev| |y_cur|); 1 for two zero vectors, 0 for one; NaN when the sums are not finite."""
    dot, sq_prev, sq_cur = _float32(dot), _float32(sq_prev), _float32(sq_cur)
    denom = torch.sqrt(sq_prev) * torch.sqrt(sq_cur)
    phi = dot / torch.where(denom > 0, denom, torch.ones_like(denom))
    phi = torch.where(denom > 0, phi, torch.zeros_like(phi))
    phi = torch.where((sq_prev == 0) & (sq_cur == 0), torch.ones_like(phi), phi)
    finite = torch.isfinite(dot) & torch.isfinite(sq_prev) & torch.isfinite(sq_cur) & torch.isfinite(phi)
    # Rounding can push |cos| a hair above 1.
    return torch.where(finite, phi.clamp(-1.0, 1.0), torch.full_like(phi, float("nan")))


def velocity(phi: torch.Tensor, phi_prev: torch.Tensor, v_prev: torch.Tensor, mu: float) -> torch.Tensor:
    """v^t = (phi^t - phi^{t-1}) - mu * v^{t-1}, with an undefined (NaN) v^{t-1} taken as 0."""
    dphi = _float32(phi) - _float32(phi_prev)
    return torch.where(torch.isnan(v_prev), dphi, dphi - mu * _float32(v_prev))


def at_equilibrium(v: torch.Tensor, eps: float) -> torch.Tensor:
    """|v| < eps; an undefined or non-finite velocity is never at equilibrium."""
    return torch.isfinite(v) & (v.abs() < eps)


def typical_change(phi: torch.Tensor) -> float:
    """m = median over units of (1 - phi), the typical change of a group of units at one check; non-finite values
    are ignored, NaN when no unit has a finite similarity."""
    change = 1 - _float32(phi)
    change = change[torch.isfinite(change)]
    return float(change.median()) if change.numel() else float("nan")


def relative_scale(phi_per_layer: list[torch.Tensor]) -> float:
    """s = max over layers of the layer's typical change (median 1 - phi) at this check; NaN when no layer has one."""
    medians = [m for m in (typical_change(p) for p in phi_per_layer) if m == m]
    return max(medians) if medians else float("nan")


def relative_equilibrium(
    v: torch.Tensor, phi: torch.Tensor, scale: float, eps_relative: float, velocity_max: float = 0.0
) -> torch.Tensor:
    """|v| < eps_rel * s and (1 - phi) < eps_rel * s; with ``velocity_max > 0`` also |v| < velocity_max (the cap
    ``NEqConfig.eps_relative_max``). Never at equilibrium with an undefined v, phi or scale."""
    limit = eps_relative * scale
    if velocity_max > 0:
        limit = min(limit, velocity_max)
    return still(phi, scale, eps_relative) & torch.isfinite(v) & (v.abs() < limit)


def still(phi: torch.Tensor, scale: float, eps_relative: float) -> torch.Tensor:
    """(1 - phi) < eps_rel * s: the relative rule's condition for a frozen unit to stay frozen (its output does not
    move); False with an undefined phi or scale."""
    limit = eps_relative * scale
    if not (limit == limit and limit > 0):
        return torch.zeros(phi.shape, dtype=torch.bool, device=phi.device)
    moving = 1 - _float32(phi)
    return torch.isfinite(moving) & (moving < limit)


def layer_rule(equilibrium_fraction: list[float], threshold: float) -> int:
    """Number of bottom layers frozen whole: layer l is, when at least ``threshold`` of its units are at equilibrium
    and every layer below it is frozen whole. ``threshold = 1.0`` freezes only layers already wholly at equilibrium,
    i.e. per-unit freezing."""
    k = 0
    while k < len(equilibrium_fraction) and equilibrium_fraction[k] >= threshold:
        k += 1
    return k
