"""The relative equilibrium rule and the layer rule: hand-computed values, scale invariance, and tau = 1.0 being
per-unit freezing exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_classifier

from neq_hf import NEqConfig
from neq_hf.equilibrium import (
    at_equilibrium,
    layer_rule,
    relative_equilibrium,
    relative_scale,
    still,
    typical_change,
    velocity,
)
from neq_hf.tracker import EquilibriumTracker
from neq_hf.units import discover_units


def test_typical_change_is_the_median_change_ignoring_non_finite():
    phi = torch.tensor([0.9, 0.99, 0.5, float("nan"), 0.8])
    # 1 - phi over the finite units: 0.1, 0.01, 0.5, 0.2 -> median (torch: lower of the two middle values) 0.1
    assert typical_change(phi) == pytest.approx(0.1)
    assert math.isnan(typical_change(torch.tensor([float("nan")])))


def test_relative_scale_by_hand():
    # layer medians of 1 - phi: 0.1, 0.01 (NaN ignored), none -> s = 0.1
    layers = [torch.tensor([0.9, 0.95, 0.5]), torch.tensor([0.99, float("nan"), 0.98]), torch.tensor([float("nan")])]
    assert relative_scale(layers) == pytest.approx(0.1)
    assert math.isnan(relative_scale([torch.tensor([float("nan")])]))


def test_scale_is_the_fastest_layer_now_not_a_running_peak():
    unit_map = discover_units(tiny_classifier("bert"))
    tracker = EquilibriumTracker(unit_map, NEqConfig(min_loss_drop=0, criterion="relative"))
    assert len(tracker.layers) >= 2
    for m in (0.01, 0.04, 0.002):
        for layer, kind in tracker.keys:
            # layer l's units change by m * (l + 1): the top layer moves most
            tracker.phi[(layer, kind)] = torch.full((tracker.num_units[(layer, kind)],), 1 - m * (layer + 1))
        tracker._update_scale()
        top = m * (max(tracker.layers) + 1)
        assert tracker.scale["heads"] == pytest.approx(top, rel=1e-4)
        assert tracker.scale["neurons"] == pytest.approx(top, rel=1e-4)


def test_relative_rule_never_freezes_the_fastest_layer_whole():
    """However little the whole network moves, the layer that moves most keeps training (and so the layers above)."""
    unit_map = discover_units(tiny_classifier("bert"))
    cfg = NEqConfig(min_loss_drop=0, criterion="relative", eps_relative=0.5, layer_threshold=0.5)
    tracker = EquilibriumTracker(unit_map, cfg)
    top = max(tracker.layers)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 7):
        tracker.t = t
        for layer, kind in tracker.keys:
            n = tracker.num_units[(layer, kind)]
            # every layer slows down 3x per check; the bottom layers move 100x less than the top one
            change = 1e-2 / 3**t * (1e-2 if layer < top else 1.0) * (0.5 + torch.rand(n, generator=g))
            phi = 1 - change
            tracker.v[(layer, kind)] = velocity(phi, tracker.phi[(layer, kind)], tracker.v[(layer, kind)], cfg.mu)
            tracker.phi[(layer, kind)] = phi
        tracker._update_scale()
        tracker._decide()
    assert tracker.layers_frozen == top  # every layer below the fastest one, not the fastest one
    assert not tracker.frozen[(top, "heads")].all() and not tracker.frozen[(top, "neurons")].all()


def test_relative_rule_by_hand():
    v = torch.tensor([0.001, 0.001, 0.02, 0.001, float("nan")])
    phi = torch.tensor([0.999, 0.95, 0.999, 0.9995, 0.999])
    # limit = 0.1 * 0.1 = 0.01: unit 0 at rest; unit 1 still moving (1 - phi = 0.05); unit 2 accelerating;
    # unit 3 at rest; unit 4 undefined velocity.
    got = relative_equilibrium(v, phi, scale=0.1, eps_relative=0.1)
    assert got.tolist() == [True, False, False, True, False]
    # no scale (nothing moved, or NaN) -> never at rest
    assert not relative_equilibrium(v, phi, scale=0.0, eps_relative=0.1).any()
    assert not relative_equilibrium(v, phi, scale=float("nan"), eps_relative=0.1).any()


def test_velocity_cap_by_hand():
    """eps_relative_max caps the velocity threshold: |v| < min(eps_rel * s, cap); the change condition is unchanged."""
    v = torch.tensor([0.002, 0.004, 0.004, 0.02, 0.002])
    phi = torch.tensor([0.999, 0.999, 0.95, 0.999, 0.9999])
    # uncapped limit 0.1 * 0.1 = 0.01: units 0, 1, 4 at rest (unit 2 moves, unit 3 accelerates)
    assert relative_equilibrium(v, phi, scale=0.1, eps_relative=0.1).tolist() == [True, True, False, False, True]
    # capped at 3e-3: unit 1 (|v| = 0.004) no longer at rest
    capped = relative_equilibrium(v, phi, scale=0.1, eps_relative=0.1, velocity_max=3e-3)
    assert capped.tolist() == [True, False, False, False, True]
    # a cap above eps_rel * s changes nothing: at a small scale the rule is the relative one exactly
    g = torch.Generator().manual_seed(0)
    v, phi = 1e-3 * torch.randn(1000, generator=g), 1 - 1e-3 * torch.rand(1000, generator=g)
    for scale in (1e-3, 0.01, 0.03):
        plain = relative_equilibrium(v, phi, scale, 0.1)
        assert plain.any()
        assert torch.equal(relative_equilibrium(v, phi, scale, 0.1, velocity_max=3e-3), plain)
    # ... and with a large scale the cap is the limit: the absolute rule at the cap, among units that do not move
    scale = 1.0
    assert torch.equal(
        relative_equilibrium(v, phi, scale, 0.1, velocity_max=3e-4), at_equilibrium(v, 3e-4) & still(phi, scale, 0.1)
    )


def test_velocity_cap_in_the_tracker_and_its_figure():
    """The default cap (3e-3) holds back units that are slow only against a fast top; the history counts them."""
    unit_map = discover_units(tiny_classifier("bert"))
    capped_cfg = NEqConfig(min_loss_drop=0, eps_relative=0.1, layer_threshold=0.9)
    assert capped_cfg.eps_relative_max == 3e-3
    plain_cfg = NEqConfig(min_loss_drop=0, eps_relative=0.1, layer_threshold=0.9, eps_relative_max=0)
    capped, plain = EquilibriumTracker(unit_map, capped_cfg), EquilibriumTracker(unit_map, plain_cfg)
    capped.t = plain.t = 1

    def moving(tracker, bottom):
        # layer 0 changes by ``bottom[t]`` (its velocity: the differences), the layers above by 0.2 (s = 0.2)
        return {k: torch.full((tracker.num_units[k],), bottom if k[0] == 0 else 0.2) for k in tracker.keys}

    # layer 0: 1 - phi = 0.001 then 0.006 then 0.006: velocity -0.005 at the second check (|v| < 0.1 x 0.2 = 0.02
    # but above the cap 0.003), then 0.0025 (mu = 0.5: 0 - 0.5 x -0.005; under the cap)
    for bottom, plain_frozen, capped_frozen in ((0.001, 0, 0), (0.006, 1, 0), (0.006, 1, 1)):
        _step(plain, plain_cfg, moving(plain, bottom))
        _step(capped, capped_cfg, moving(capped, bottom))
        assert (plain.layers_frozen, capped.layers_frozen) == (plain_frozen, capped_frozen)
    figures = capped._figures(nonfinite=0)
    assert figures["capped/neurons"] == 0 and "capped/neurons" not in plain._figures(nonfinite=0)
    capped2 = EquilibriumTracker(unit_map, capped_cfg)
    capped2.t = 1
    _step(capped2, capped_cfg, moving(capped2, 0.001))
    _step(capped2, capped_cfg, moving(capped2, 0.006))
    n0 = capped2.num_units[(0, "neurons")]
    total = sum(capped2.num_units[k] for k in capped2.keys if k[1] == "neurons")
    assert capped2._figures(nonfinite=0)["capped/neurons"] == pytest.approx(n0 / total)


def test_still_by_hand():
    phi = torch.tensor([1.0, 0.999, 0.99, float("nan")])
    # limit = 0.1 * 0.05 = 0.005: 1 - phi = 0, 0.001 stay; 0.01 moves; NaN undefined
    assert still(phi, scale=0.05, eps_relative=0.1).tolist() == [True, True, False, False]
    assert not still(phi, scale=0.0, eps_relative=0.1).any()
    assert not still(phi, scale=float("nan"), eps_relative=0.1).any()


def _step(tracker, cfg, changes):
    """One check of a tracker fed a per-key vector of 1 - phi."""
    tracker.t += 1
    for key, change in changes.items():
        phi = 1 - change
        tracker.v[key] = velocity(phi, tracker.phi[key], tracker.v[key], cfg.mu)
        tracker.phi[key] = phi
    tracker._update_scale()
    tracker._decide()


@pytest.mark.parametrize("criterion", ["relative", "absolute"])
def test_a_frozen_unit_stays_frozen_while_its_output_does_not_move(criterion):
    """Freezing stops a unit's own updates, so its phi jumps to 1 and its velocity spikes: under the relative rule
    that spike does not release it (only a moving output does); the absolute rule keeps the paper's |v| < eps."""
    unit_map = discover_units(tiny_classifier("bert"))
    cfg = NEqConfig(
        min_loss_drop=0, criterion=criterion, eps=1e-3, eps_relative=0.1, layer_threshold=1.0, granularity="unit"
    )
    tracker = EquilibriumTracker(unit_map, cfg)
    tracker.t = 1
    key = (0, "neurons")
    top = {k: torch.full((tracker.num_units[k],), 0.1) for k in tracker.keys if k[0] == max(tracker.layers)}

    def changes(unit0, unit1, top_change):
        # every other unit changes by half the top layer's change, so s is the top layer's
        out = {k: torch.full((tracker.num_units[k],), top_change / 2) for k in tracker.keys}
        out.update({k: torch.full_like(v, top_change) for k, v in top.items()})
        out[key][0], out[key][1] = unit0, unit1
        return out

    # checks 2 and 3: units 0 and 1 change by 0.0008 at each check, with s = 0.1 (limit 0.01 relative); at rest
    _step(tracker, cfg, changes(0.0008, 0.0008, 0.1))
    _step(tracker, cfg, changes(0.0008, 0.0008, 0.1))
    assert tracker.frozen[key][:2].tolist() == [True, True]
    # check 4: both frozen; unit 0's output stops moving (1 - phi = 0), unit 1's moves again (0.004), and the
    # network slows down 10x (s = 0.01, limit 0.001). Unit 0's velocity is 0.0008: above the relative limit.
    _step(tracker, cfg, changes(0.0, 0.004, 0.01))
    v0 = float(tracker.v[key][0])
    assert v0 == pytest.approx(0.0008, abs=1e-6)
    if criterion == "relative":
        assert tracker.frozen[key][:2].tolist() == [True, False]  # unit 0 stays (still), unit 1 is released
    else:
        # the paper's rule: |v| < 1e-3 for unit 0 (stays), |0.004 - 0.0008| > 1e-3 for unit 1 (released)
        assert tracker.frozen[key][:2].tolist() == [True, False]
    # check 5: unit 0 still does not move; the network slows down 100x more (limit 1e-5): under the relative rule it
    # stays frozen, while its velocity -0.0004 (momentum) is far above that limit
    _step(tracker, cfg, changes(0.0, 0.004, 1e-4))
    assert bool(tracker.frozen[key][0])
    if criterion == "relative":
        assert abs(float(tracker.v[key][0])) > 10 * cfg.eps_relative * tracker.scale["neurons"]


def test_a_frozen_bottom_layer_stays_frozen_when_the_network_slows_down():
    """A whole frozen bottom layer has 1 - phi = 0 exactly: it stays frozen whatever its velocity and the scale."""
    unit_map = discover_units(tiny_classifier("bert"))
    cfg = NEqConfig(min_loss_drop=0, criterion="relative", eps_relative=0.1, layer_threshold=0.9)
    tracker = EquilibriumTracker(unit_map, cfg)
    tracker.t = 1
    top = max(tracker.layers)

    def changes(bottom, rest):
        return {k: torch.full((tracker.num_units[k],), bottom if k[0] == 0 else rest) for k in tracker.keys}

    _step(tracker, cfg, changes(0.001, 0.1))
    _step(tracker, cfg, changes(0.001, 0.1))
    assert tracker.layers_frozen == 1
    for rest in (0.01, 0.001, 1e-5):  # the network slows down with the learning rate; layer 0 no longer moves
        _step(tracker, cfg, changes(0.0, rest))
        assert tracker.layers_frozen == 1 and all(tracker.frozen[(0, k)].all() for k in cfg.unit_kinds)
    assert top > 0


def _moving(tracker, bottom, top_change):
    """1 - phi per key: layer 0 changes by ``bottom``, every layer above by ``top_change``."""
    return {k: torch.full((tracker.num_units[k],), bottom if k[0] == 0 else top_change) for k in tracker.keys}


def test_movement_gate_by_hand():
    """settle_fraction 0.25: no new freezing at a check whose scale is above a quarter of the largest so far."""
    unit_map = discover_units(tiny_classifier("bert"))
    assert len(unit_map.layers) >= 2
    cfg = NEqConfig(min_loss_drop=0, criterion="relative", eps_relative=0.1, layer_threshold=0.9, settle_fraction=0.25)
    plain = EquilibriumTracker(unit_map, NEqConfig(min_loss_drop=0, eps_relative=0.1, layer_threshold=0.9))
    gated = EquilibriumTracker(unit_map, cfg)
    plain.t = gated.t = 1
    # scale s = the upper layers' change; layer 0 changes by 1e-4 at every check (velocity 0 from the second check,
    # 1 - phi < 0.1 s): at rest at every check after the first
    expected = [  # (s, settled: s <= 0.25 * max so far, layers frozen by the gated tracker)
        (0.04, False, 0),  # first decision: s is its own peak
        (0.1, False, 0),  # a burst: peak 0.1
        (0.02, True, 1),  # 0.02 <= 0.025: the bottom layer freezes
        (0.2, False, 1),  # a new peak: nothing new freezes, nothing frozen is released
        (0.04, True, 1),  # 0.04 <= 0.05
    ]
    for i, (s, settled, frozen) in enumerate(expected):
        _step(plain, cfg, _moving(plain, 1e-4, s))
        _step(gated, cfg, _moving(gated, 1e-4, s))
        assert plain.layers_frozen == (1 if i else 0)  # without the gate: frozen from the second check on
        assert gated.scale["neurons"] == pytest.approx(s, rel=1e-4)
        assert gated.settled is settled and gated.layers_frozen == frozen
        assert gated.history == [] and gated._figures(nonfinite=0)["settled"] == int(settled)
    assert gated.scale_peak["neurons"] == pytest.approx(0.2, rel=1e-4)
    assert "settled" not in plain._figures(nonfinite=0)


def test_movement_gate_keeps_frozen_units_and_blocks_new_ones():
    unit_map = discover_units(tiny_classifier("bert"))
    cfg = NEqConfig(min_loss_drop=0, eps_relative=0.1, layer_threshold=1.0, granularity="unit", settle_fraction=0.5)
    tracker = EquilibriumTracker(unit_map, cfg)
    tracker.t = 1
    key = (0, "neurons")

    def changes(s, unit0, unit1):
        out = {k: torch.full((tracker.num_units[k],), s) for k in tracker.keys}
        out[key][0], out[key][1] = unit0, unit1
        return out

    # units 0 and 1 change by the same amount at every check (velocity 0): at rest while 1 - phi < 0.1 s
    _step(tracker, cfg, changes(0.1, 1e-4, 0.003))  # first decision: s is its own peak, nothing freezes
    assert not tracker.settled and not tracker.frozen[key][:2].any()
    _step(tracker, cfg, changes(0.025, 1e-4, 0.003))  # settled (0.025 <= 0.05): unit 0 freezes; 0.003 > 0.0025
    assert tracker.settled and tracker.frozen[key][:2].tolist() == [True, False]
    _step(tracker, cfg, changes(0.08, 0.0, 0.003))  # a burst: unit 0 stays frozen, unit 1 at rest (0.003 < 0.008)
    assert not tracker.settled and bool(tracker.equilibrium[key][1])
    assert tracker.frozen[key][:2].tolist() == [True, False]  # ... but waits
    _step(tracker, cfg, changes(0.04, 0.0, 0.003))  # settled again (0.04 <= 0.05): unit 1 freezes
    assert tracker.settled and tracker.frozen[key][:2].tolist() == [True, True]
    # the gate's state survives a checkpoint
    again = EquilibriumTracker(unit_map, cfg)
    again.load_state_dict(tracker.state_dict(), torch.device("cpu"))
    assert again.scale_peak == tracker.scale_peak and again.settled is tracker.settled


def test_layer_rule_is_bottom_up():
    assert layer_rule([1.0, 0.95, 0.97, 0.2], 0.9) == 3
    assert layer_rule([0.5, 1.0, 1.0], 0.9) == 0  # a settled upper layer does not freeze whole over a moving one
    assert layer_rule([1.0, 0.99], 1.0) == 1
    assert layer_rule([], 0.5) == 0


class _Outputs:
    """Feeds a tracker synthetic held-out outputs: units drift by ``scale * 10^layer * step_size(t)`` per check."""

    def __init__(self, tracker: EquilibriumTracker, samples: int = 6, seed: int = 0):
        self.tracker = tracker
        g = torch.Generator().manual_seed(seed)
        self.width = {k: tracker.num_units[k] * (2 if k[1] == "heads" else 1) for k in tracker.keys}
        self.base = {k: torch.randn(samples, w, generator=g) for k, w in self.width.items()}
        self.dirs = {k: torch.randn(samples, w, generator=g) for k, w in self.width.items()}
        self.rates = {k: torch.rand(w, generator=g) for k, w in self.width.items()}

    def run(self, t: int, scale: float):
        def run_pass(on_batch):
            pooled = {}
            for k in self.tracker.keys:
                # per unit, a drift that decays at a unit-specific rate
                # and layer l moves 10^l times as much as layer 0, as upper layers do in fine-tuning
                decay = self.rates[k] ** t
                size = scale * 10 ** k[0]
                pooled[k] = self.base[k] + size * self.dirs[k] * (1 - decay) + size * 0.01 * t * self.dirs[k]
            on_batch(0, pooled)

        return self.tracker.check(run_pass)


def _run(config: NEqConfig, scale: float, checks: int = 7):
    unit_map = discover_units(tiny_classifier("bert"))
    tracker = EquilibriumTracker(unit_map, config)
    feed = _Outputs(tracker)
    masks = []
    for t in range(checks):
        feed.run(t, scale)
        masks.append({k: f.clone() for k, f in tracker.frozen.items()})
    return tracker, masks


def test_relative_rule_is_invariant_to_scaling_every_change():
    """phi^t = 1 - c * d^t for every unit: the decisions do not depend on c (the absolute rule's do)."""
    unit_map = discover_units(tiny_classifier("bert"))
    g = torch.Generator().manual_seed(1)
    keys = EquilibriumTracker(unit_map, NEqConfig(min_loss_drop=0)).keys
    n = {k: unit_map.layers[k[0]].num_units(k[1]) for k in keys}
    # per unit, a change per check that decays at a unit-specific rate
    d0 = {k: torch.rand(n[k], generator=g) * 0.1 for k in keys}
    rate = {k: torch.rand(n[k], generator=g) for k in keys}

    def decisions(cfg, c):
        tracker = EquilibriumTracker(unit_map, cfg)
        for t in range(1, 7):
            tracker.t = t
            for k in keys:
                phi = 1 - c * d0[k] * rate[k] ** (t - 1)
                tracker.v[k] = velocity(phi, tracker.phi[k], tracker.v[k], cfg.mu)
                tracker.phi[k] = phi
            tracker._update_scale()
            tracker._decide()
        return {k: m.clone() for k, m in tracker.frozen.items()}

    total = sum(n.values())
    relative = NEqConfig(
        min_loss_drop=0, criterion="relative", eps_relative=0.5, layer_threshold=1.0, granularity="unit"
    )
    ref = decisions(relative, 1.0)
    assert 0 < sum(int(m.sum()) for m in ref.values()) < total
    for c in (0.25, 1 / 64):
        assert all(torch.equal(ref[k], decisions(relative, c)[k]) for k in keys)
    absolute = NEqConfig(min_loss_drop=0, criterion="absolute", eps=1e-3, layer_threshold=1.0, granularity="unit")
    counts = [sum(int(m.sum()) for m in decisions(absolute, c).values()) for c in (1.0, 1 / 64)]
    assert counts[0] < counts[1]  # the absolute rule freezes more as the run moves less


def test_layer_threshold_one_is_per_unit_freezing():
    cfg = NEqConfig(min_loss_drop=0, criterion="relative", eps_relative=0.3, layer_threshold=1.0, granularity="unit")
    tracker = EquilibriumTracker(discover_units(tiny_classifier("bert")), cfg)
    feed = _Outputs(tracker)
    total = sum(tracker.num_units.values())
    frozen_counts = []
    for t in range(7):
        feed.run(t, 1e-2)
        # tau = 1.0: the masks are exactly the per-unit equilibrium decisions, nothing frozen beyond them
        for k in tracker.keys:
            assert torch.equal(tracker.frozen[k], tracker.equilibrium[k]), (t, k)
        frozen_counts.append(sum(int(m.sum()) for m in tracker.frozen.values()))
    assert 0 < frozen_counts[-1] < total  # some units at rest, not all: the comparison is not vacuous
    # the default threshold (0.5) freezes whole layers over the same outputs: more than per-unit freezing
    _, layered = _run(
        NEqConfig(min_loss_drop=0, criterion="relative", eps_relative=0.3, layer_threshold=0.5), scale=1e-2
    )
    assert sum(int(m.sum()) for m in layered[-1].values()) >= frozen_counts[-1]


def test_layer_threshold_freezes_whole_bottom_layers():
    cfg = NEqConfig(min_loss_drop=0, criterion="relative", eps_relative=0.3, layer_threshold=0.05)
    tracker, masks = _run(cfg, scale=1e-2)
    fractions = [
        sum(int(tracker.equilibrium[(layer, kind)].sum()) for kind in cfg.unit_kinds)
        / sum(tracker.num_units[(layer, kind)] for kind in cfg.unit_kinds)
        for layer in tracker.layers
    ]
    expected = layer_rule(fractions, 0.05)
    assert tracker.layers_frozen == expected >= 1
    for (layer, _), mask in masks[-1].items():
        if layer < expected:
            assert bool(mask.all())
        else:
            assert torch.equal(mask, tracker.equilibrium[(layer, _)])


def test_a_pass_may_skip_only_the_constant_prefix():
    """A held-out pass that skipped the frozen prefix leaves those layers out: their last outputs stand in for them;
    leaving out any other layer is an error, not a silently unchanged layer."""
    tracker = EquilibriumTracker(discover_units(tiny_classifier("bert")), NEqConfig(min_loss_drop=0))
    feed = _Outputs(tracker)
    feed.run(0, 1e-2)
    feed.run(1, 1e-2)

    def without_layer0(on_batch):
        def keep(start, pooled):
            on_batch(start, {k: v for k, v in pooled.items() if k[0] != 0})

        keep(0, {k: feed.base[k] + 1e-2 * feed.dirs[k] for k in tracker.keys})

    with pytest.raises(ValueError, match="no outputs for layer 0"):
        tracker.check(without_layer0)
    for key in tracker.keys:  # frozen masks do not matter: what the pass may skip is what the caller says is constant
        if key[0] == 0:
            tracker.frozen[key] = torch.ones_like(tracker.frozen[key])
    with pytest.raises(ValueError, match="no outputs for layer 0"):
        tracker.check(without_layer0)
    before = {k: tracker.reference[k].clone() for k in tracker.keys if k[0] == 0}
    tracker.constant_layers = 1
    tracker.check(without_layer0)
    for k, ref in before.items():
        assert torch.equal(tracker.reference[k], ref)  # unchanged outputs
        assert torch.allclose(tracker.phi[k], torch.ones_like(tracker.phi[k]), atol=1e-6)  # phi = 1: did not move


def test_relative_rule_is_the_absolute_rule_at_eps_relative_times_s_for_units_at_rest():
    """Where every unit's change is below the limit, the relative rule is the paper's |v| < eps with eps = eps_rel * s."""
    g = torch.Generator().manual_seed(0)
    v = (torch.rand(500, generator=g) - 0.5) * 4e-3
    phi = 1 - torch.rand(500, generator=g) * 1e-4  # 1 - phi < 1e-4 < limit
    scale, eps_relative = 0.01, 0.1  # limit 1e-3
    assert torch.equal(relative_equilibrium(v, phi, scale, eps_relative), at_equilibrium(v, eps_relative * scale))
    assert 0 < int(at_equilibrium(v, 1e-3).sum()) < 500  # not vacuous
