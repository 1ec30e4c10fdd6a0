"""The training-progress gate (NEqConfig.min_loss_drop) and whole-layer granularity (NEqConfig.granularity)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import pad_collator, tiny_classifier, token_dataset, training_args

import neq_hf.engine as engine_module
from neq_hf import NEq, NEqConfig, NEqTrainer, NEqTrainerCallback
from neq_hf.model_card import render_neq_section
from neq_hf.tracker import EquilibriumTracker
from neq_hf.units import discover_units


def _engine(**config) -> NEq:
    # absolute rule with a huge eps: every unit is at equilibrium, so what freezes is decided by the gate alone
    config = {
        "criterion": "absolute",
        "eps": 1e9,
        "layer_threshold": 1.0,
        "granularity": "unit",
        **config,
    }
    cfg = NEqConfig(check_every=2, **config)
    return NEq(tiny_classifier("bert"), cfg, token_dataset(16, with_labels=False), data_collator=pad_collator)


def _frozen_fraction(neq: NEq) -> float:
    masks = neq.tracker.frozen.values()
    return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def test_gate_holds_every_decision_until_the_loss_dropped_by_min_loss_drop():
    neq = _engine(min_loss_drop=0.2).setup(max_steps=40)
    intervals = {2: [1.0, 1.0], 4: [0.9, 0.85], 6: [0.85, 0.82], 8: [0.7, 0.75], 10: [1.0, 1.0]}
    seen = {}
    for step, losses in intervals.items():
        for loss in losses:
            neq.record_step_loss(torch.tensor(loss))
        record = neq.run_check(step)
        seen[step] = (record["held"], _frozen_fraction(neq))
    assert neq.tracker.loss_start == pytest.approx(1.0)  # the first interval's mean
    # 0.875 and 0.835 are above 0.8 = (1 - 0.2) x 1.0: held although every unit is at equilibrium
    assert seen[4] == (1, 0.0) and seen[6] == (1, 0.0)
    assert seen[8] == (0, 1.0) and neq.tracker.gate_step == 8  # 0.725 <= 0.8: open
    assert seen[10] == (0, 1.0)  # open for good, whatever the loss does next
    state = neq.state_dict()
    fresh = _engine(min_loss_drop=0.2)
    fresh.load_state_dict(state)
    assert fresh.tracker.gate_step == 8 and fresh.tracker.loss_start == pytest.approx(1.0)


def test_gate_off_decides_at_the_first_decision_check():
    neq = _engine(min_loss_drop=0.0).setup(max_steps=40)
    neq.run_check(2)
    record = neq.run_check(4)  # warmup=1: the second check decides
    assert record["held"] == 0 and _frozen_fraction(neq) == 1.0


def test_gate_reads_logged_losses_when_no_step_loss_is_recorded():
    neq = _engine(min_loss_drop=0.2).setup(max_steps=40)
    neq.observe_loss(2, 1.0)
    neq.run_check(2)
    neq.observe_loss(4, 0.9)
    assert neq.run_check(4)["held"] == 1
    neq.observe_loss(5, 0.7)
    neq.observe_loss(6, 0.75)
    assert neq.run_check(6)["held"] == 0 and neq.tracker.gate_step == 6


def test_gate_warns_when_no_loss_arrives(caplog):
    neq = _engine(min_loss_drop=0.2).setup(max_steps=40)
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        for step in (2, 4, 6):
            neq.run_check(step)
    assert _frozen_fraction(neq) == 0.0
    assert any("min_loss_drop needs the training loss" in w for w in neq.warnings)


def _step(neq: NEq, step: int, loss: float):
    neq.record_step_loss(torch.tensor(loss))
    return neq.step_end(step)


def test_checks_wait_until_the_loss_dropped_by_checks_from_loss_drop():
    neq = _engine(min_loss_drop=0.2, checks_from_loss_drop=0.1).setup(max_steps=40)
    assert neq.tracker.history == []  # no reference check at setup
    losses = {1: 1.0, 2: 1.0, 3: 0.95, 4: 0.93, 5: 0.9, 6: 0.86, 7: 0.85, 8: 0.85, 9: 0.7, 10: 0.7}
    records = {step: _step(neq, step, loss) for step, loss in losses.items()}
    # step 2 sets the start (1.0); 0.94 at step 4 is above 0.9; 0.88 at step 6 is not: the reference outputs
    assert records[2] is None and records[4] is None and neq.tracker.loss_start == pytest.approx(1.0)
    assert [h["step"] for h in neq.tracker.history] == [6, 8, 10]
    assert records[6]["check"] == 0 and records[8]["held"] == 1  # 0.85 > 0.8: the gate holds
    # 0.7 <= 0.8 opens the gate at step 10, the second check after the reference: the first that can decide
    assert neq.tracker.gate_step == 10 and records[10]["held"] == 0 and _frozen_fraction(neq) == 1.0
    summary = neq.summary()
    assert summary["reference_step"] == 6 and summary["waited_checks"] == 2
    # the average counts the due checks at steps 2, 4 (waited) and 6 (the reference) as freezing nothing
    assert summary["average_frozen_fraction"] == pytest.approx((0.0 + 1.0) / 5)


def test_checks_that_wait_resume_where_they_stopped():
    def run(neq, steps):
        return [_step(neq, step, 1.0 if step <= 4 else 0.85) for step in steps]

    whole = _engine(min_loss_drop=0.2, checks_from_loss_drop=0.1).setup(max_steps=40)
    run(whole, range(1, 11))
    first = _engine(min_loss_drop=0.2, checks_from_loss_drop=0.1).setup(max_steps=40)
    run(first, range(1, 5))
    state = first.state_dict()  # at step 4: the start is known, no reference yet
    assert first.tracker.t == 0 and first.tracker.loss_start == pytest.approx(1.0)
    again = _engine(min_loss_drop=0.2, checks_from_loss_drop=0.1)
    again.load_state_dict(state)
    again.setup(max_steps=40)
    assert again.tracker.history == []
    run(again, range(5, 11))
    assert [h["step"] for h in again.tracker.history] == [h["step"] for h in whole.tracker.history] == [6, 8, 10]
    timing = {"train_seconds": 0, "check_seconds": 0, "check_time_fraction": 0}
    assert again.summary() | timing == whole.summary() | timing


def test_checks_start_at_once_without_a_loss_or_without_the_gate():
    no_loss = _engine(min_loss_drop=0.2, checks_from_loss_drop=0.1).setup(max_steps=40)
    assert no_loss.tracker.history == [] and no_loss.step_end(2)["check"] == 0  # nothing to wait for
    no_gate = _engine(min_loss_drop=0.0, checks_from_loss_drop=0.1).setup(max_steps=40)
    assert [h["step"] for h in no_gate.tracker.history] == [0]  # the reference at setup, as always


def test_checks_that_wait_still_warn_when_the_loss_never_drops():
    neq = _engine(min_loss_drop=0.2, checks_from_loss_drop=0.1).setup(max_steps=8)
    for step in range(1, 9):
        assert _step(neq, step, 1.0) is None
    assert neq.tracker.history == [] and neq.summary()["final_frozen_fraction"] == 0.0
    assert any("has not dropped by NEqConfig.min_loss_drop" in w for w in neq.warnings)


def _easy_dataset(n: int):
    """A task the tiny model learns in a few steps: the label is whether the first token is in the lower half."""
    from conftest import VOCAB

    return token_dataset(n).map(lambda row: {"labels": int(row["input_ids"][0] < VOCAB // 2)})


def _trainer_run(tmp_path, name, learning_rate, **config):
    trainer = NEqTrainer(
        model=tiny_classifier("bert", seed=1),
        args=training_args(tmp_path / name, max_steps=24, learning_rate=learning_rate, logging_steps=100),
        train_dataset=_easy_dataset(192),
        data_collator=pad_collator,
        neq_config=NEqConfig(criterion="absolute", eps=1e9, check_every=2, holdout_size=16, **config),
    )
    trainer.train()
    return trainer


def test_trainer_run_on_a_plateau_freezes_nothing_and_says_so(tmp_path):
    """No learning (learning rate 0): the loss never drops, so NEq freezes nothing although every unit is at rest,
    and warns once half of the run has passed. The Trainer's logs are too sparse here (logging_steps=100): the gate
    reads the loss of every step, which NEqTrainer records."""
    for wait in (0.0, 0.03):  # checks from step 0 (the default), or once the loss dropped by 3%: never here
        plateau = _trainer_run(
            tmp_path / str(wait), "plateau", learning_rate=0.0, min_loss_drop=0.1, checks_from_loss_drop=wait
        )
        engine = plateau.neq_callback.engine
        checks = [h for h in engine.tracker.history if h["check"] > 0]
        if wait:
            assert engine.tracker.history == [] and engine.summary()["final_frozen_fraction"] == 0.0
            section = render_neq_section(plateau.neq_config, engine.summary())  # the model card's NEq section
            assert "Held-out checks: none ran" in section and "| all |  | 0.0% | 0.0% |" in section
        else:
            assert checks and all(h["held"] == 1 and h["frozen_fraction"] == 0.0 for h in checks)
        assert engine.tracker.loss_start is not None and engine.tracker.gate_step is None
        assert any("has not dropped by NEqConfig.min_loss_drop" in w for w in engine.warnings)
        for p in plateau.model.parameters():
            assert p.requires_grad


def test_trainer_run_that_learns_opens_the_gate(tmp_path):
    learning = _trainer_run(tmp_path, "learning", learning_rate=1e-2, min_loss_drop=0.1)
    tracker = learning.neq_callback.engine.tracker
    assert tracker.gate_step is not None
    checks = [h for h in tracker.history if h["check"] > 0]
    assert all(h["frozen_fraction"] == 0.0 for h in checks if h["step"] < tracker.gate_step)
    assert any(h["frozen_fraction"] > 0 for h in checks if h["step"] >= tracker.gate_step)


def test_callback_with_sparse_logs_warns_that_the_gate_sees_no_loss(tmp_path):
    from transformers import Trainer

    model = tiny_classifier("bert", seed=1)
    callback = NEqTrainerCallback(
        NEqConfig(criterion="absolute", eps=1e9, check_every=2), token_dataset(16, seed=5, with_labels=False)
    )
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "cb", max_steps=12, logging_steps=100),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        callbacks=[callback],
    )
    trainer.train()
    assert all(h["frozen_fraction"] == 0.0 for h in callback.engine.tracker.history)
    assert any("NEqTrainerCallback reads it from the Trainer's logs" in w for w in callback.engine.warnings)


# -- granularity="layer" --------------------------------------------------------------------------------------------
def test_layer_granularity_freezes_whole_bottom_layers_only():
    unit_map = discover_units(tiny_classifier("bert"))
    results = {}
    for granularity in ("unit", "layer"):
        cfg = NEqConfig(min_loss_drop=0, layer_threshold=0.5, granularity=granularity)
        tracker = EquilibriumTracker(unit_map, cfg)
        tracker.t = cfg.warmup + 1
        tracker.scale = {kind: 1.0 for kind in cfg.unit_kinds}
        for (layer, kind), n in tracker.num_units.items():
            # layer 0: 75% of its units at rest (whole-layer freeze at 0.5); layer 1: 25% (no whole-layer freeze)
            at_rest = torch.arange(n) < (3 * n // 4 if layer == 0 else n // 4)
            tracker.phi[(layer, kind)] = torch.where(at_rest, 1.0, 0.0)
            tracker.v[(layer, kind)] = torch.where(at_rest, 0.0, 1.0)
        tracker._decide()
        results[granularity] = {k: m.clone() for k, m in tracker.frozen.items()}
        assert tracker.layers_frozen == 1
        figures = tracker._figures(nonfinite=0)
        for kind in cfg.unit_kinds:  # what the rule found at rest, whatever froze
            n = [tracker.num_units[(layer, kind)] for layer in tracker.layers]
            assert figures[f"per_layer_at_rest/{kind}"] == [(3 * n[0] // 4) / n[0], (n[1] // 4) / n[1]]
            assert figures[f"per_layer/{kind}"][1] == (0.0 if granularity == "layer" else (n[1] // 4) / n[1])
    for (layer, _kind), mask in results["layer"].items():
        assert bool(mask.all()) if layer == 0 else not bool(mask.any())
    # with units, the 25% at rest in layer 1 freeze too: the comparison is not vacuous
    assert all(results["unit"][(1, kind)].any() for kind in ("heads", "neurons"))


def test_the_default_layer_granularity_leaves_no_partly_frozen_tensor(tmp_path):
    trainer = NEqTrainer(
        model=tiny_classifier("bert", seed=1),
        args=training_args(tmp_path / "layer", max_steps=16, learning_rate=3e-3),
        train_dataset=token_dataset(192),
        data_collator=pad_collator,
        # granularity left at its default, "layer"
        neq_config=NEqConfig(min_loss_drop=0, criterion="absolute", eps=1e9, check_every=2, holdout_size=16),
    )
    frozen_partials = []
    original = trainer.neq_callback.__class__.on_step_end

    def watch(self, args, state, control, model=None, **kwargs):
        out = original(self, args, state, control, model=model, **kwargs)
        if self.engine is not None:
            frozen_partials.append(len(self.engine.freezer._partials))
        return out

    trainer.neq_callback.on_step_end = watch.__get__(trainer.neq_callback)
    trainer.train()
    summary = trainer.neq_summary()
    assert summary["final_frozen_fraction"] > 0  # whole layers froze
    assert frozen_partials and max(frozen_partials) == 0


def test_config_validates_the_new_fields():
    for field, value in (
        ("granularity", "neuron"),
        ("min_loss_drop", 1.0),
        ("min_loss_drop", -0.1),
        ("checks_from_loss_drop", -0.01),
        ("checks_from_loss_drop", 1.0),
        ("checks_from_loss_drop", True),
    ):
        with pytest.raises(ValueError, match=f"NEqConfig.{field}="):
            NEqConfig(**{field: value})
    assert NEqConfig().min_loss_drop == 0.1 and NEqConfig().granularity == "layer"
    assert NEqConfig().checks_from_loss_drop == 0.0


def test_auto_granularity_is_unit_on_cpu_and_layer_on_cuda_for_small_models(monkeypatch):
    neq = _engine(min_loss_drop=0, granularity="auto")
    assert neq.tracker.granularity == "unit" and neq.summary()["granularity"] == "unit"  # the model is on CPU
    unit = _engine(min_loss_drop=0, granularity="unit")
    monkeypatch.setattr(NEq, "_device", lambda self: torch.device("cuda", 0))  # as if the model had moved to a GPU
    neq._resolve_granularity()
    unit._resolve_granularity()
    assert neq.tracker.granularity == "layer" and unit.tracker.granularity == "unit"
    # a model above the threshold (compute-bound on a GPU) keeps per-unit freezing
    monkeypatch.setattr(engine_module, "AUTO_UNIT_MIN_PARAMETERS", sum(p.numel() for p in neq.model.parameters()))
    neq._resolve_granularity()
    assert neq.tracker.granularity == "unit"
