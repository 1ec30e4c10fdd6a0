"""`NEqTrainer` as a drop-in `Trainer`: representative behaviours of upstream's Trainer tests (logging cadence, event
order, resume equality of state and log history, evaluation-only use, tiny datasets, `max_steps=1`) on tiny BERT,
GPT-2 and Llama models."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import pad_collator, paper_rule, tiny_classifier, token_dataset, training_args
from transformers import Trainer, TrainerCallback

from neq_hf import NEqConfig, NEqTrainer, split_holdout

MODELS = ["bert", "gpt2", "llama"]
# upstream's check_trainer_state_are_the_same skips these (wall-clock figures and a loss averaged per train() call)
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")


def make(
    cls, tmp_path, model_type, config=None, train=None, neq_dataset=None, callbacks=(), eval_dataset=None, **overrides
):
    """A `Trainer` or `NEqTrainer` run; built right before it trains, as `Trainer` seeds torch when it is built."""
    kwargs = dict(
        model=tiny_classifier(model_type, seed=1),
        args=training_args(tmp_path / cls.__name__, **overrides),
        train_dataset=train if train is not None else token_dataset(96),
        data_collator=pad_collator,
        callbacks=[cb() for cb in callbacks],
        eval_dataset=eval_dataset,
    )
    if cls is NEqTrainer:
        kwargs.update(neq_config=config, neq_dataset=neq_dataset)
    return cls(**kwargs)


def trained(cls, *args, **kwargs):
    trainer = make(cls, *args, **kwargs)
    trainer.train()
    return trainer


def assert_same_weights(a, b) -> None:
    pb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        assert torch.equal(p, pb[n]), n


def regular_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if not any(k.startswith("neq/") for k in h)]


@pytest.mark.parametrize("model_type", MODELS)
def test_logging_cadence_and_losses_are_the_trainers(tmp_path, model_type):
    """NEq checks every 2 steps, the Trainer logs every 4: the loss logs fall on the same steps with the same values
    (nothing freezes at eps=0, so training is the Trainer's), and NEq entries neither reset the loss window nor carry
    wall-clock figures."""
    train, held = split_holdout(token_dataset(96), 16, seed=0)
    config = paper_rule(eps=0.0, check_every=2)
    plain = trained(Trainer, tmp_path, model_type, train=train, logging_steps=4)
    neq = trained(NEqTrainer, tmp_path, model_type, config, train=train, neq_dataset=held, logging_steps=4)
    expected = [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in regular_logs(plain)]
    assert [h["step"] for h in expected] == [4, 8, 12, 12]
    assert [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in regular_logs(neq)] == expected
    entries = [h for h in neq.state.log_history if "neq/frozen_fraction" in h]
    assert [h["step"] for h in entries] == [2, 4, 6, 8, 10, 12]
    assert not any("loss" in h or "seconds" in "".join(h) for h in entries)
    assert_same_weights(plain.model, neq.model)


class EventRecorder(TrainerCallback):
    """Every event with its step (upstream's MyTestTrainerCallback), and whether a log holds NEq figures only."""

    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):

            def record(args, state, control, logs=None, **kwargs):
                neq_only = bool(logs) and all(k.startswith("neq/") or k == "epoch" for k in logs)
                self.events.append((name, state.global_step, neq_only))

            return record
        return super().__getattribute__(name)


def test_callback_events_are_the_trainers(tmp_path):
    """Same events in the same order as with `Trainer` (evaluation and saving included); NEq's own log entries add
    one `on_log` at each check."""
    args = dict(
        max_steps=12, logging_steps=4, eval_strategy="steps", eval_steps=5, save_strategy="steps", save_steps=6
    )
    config = paper_rule(eps=2e-3, check_every=3)
    train, held = split_holdout(token_dataset(96), 16, seed=0)  # the same epochs for both
    plain, neq = (
        trained(cls, tmp_path, "bert", config, train, held, [EventRecorder], token_dataset(16, seed=1), **args)
        for cls in (Trainer, NEqTrainer)
    )
    recorded = [next(cb for cb in t.callback_handler.callbacks if isinstance(cb, EventRecorder)) for t in (plain, neq)]
    plain_events, neq_events = (r.events for r in recorded)
    assert [e for e in neq_events if not e[2]] == plain_events
    assert [e[1] for e in neq_events if e[2]] == [3, 6, 9, 12]


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_resumed_run_has_the_uninterrupted_state_and_log_history(tmp_path, model_type):
    """Upstream's checkpoint tests: weights, `TrainerState` and `log_history` (apart from timing fields) of a run
    resumed from its step-6 checkpoint equal those of the uninterrupted run."""

    def run(name, resume=None):
        trainer = NEqTrainer(
            model=tiny_classifier(model_type, seed=3),
            args=training_args(
                tmp_path / name, logging_steps=2, save_strategy="steps", save_steps=6, learning_rate=3e-3
            ),
            train_dataset=token_dataset(96),
            data_collator=pad_collator,
            neq_config=paper_rule(
                eps=5e-3,
                check_every=2,
                holdout_size=16,
            ),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    resumed = run("resumed", resume=str(tmp_path / "full" / "checkpoint-6"))
    assert any(h["frozen_fraction"] > 0 for h in full.neq_callback.tracker.history), "something should freeze"
    assert_same_weights(full.model, resumed.model)
    state, state_resumed = dataclasses.asdict(full.state), dataclasses.asdict(resumed.state)
    history, history_resumed = state.pop("log_history"), state_resumed.pop("log_history")
    assert state == state_resumed
    strip = [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]
    assert strip == [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history_resumed]
    assert sum("neq/frozen_fraction" in h for h in history) == 6 and sum("loss" in h for h in history) == 6


def test_evaluation_and_prediction_without_a_training_set(tmp_path):
    """No train_dataset (evaluation or prediction only) is accepted as by `Trainer`; a training set given later is
    carved when `train()` begins."""
    data = token_dataset(24, seed=2)
    outputs = []
    for cls in (Trainer, NEqTrainer):
        trainer = cls(
            model=tiny_classifier("bert", seed=1),
            args=training_args(tmp_path / cls.__name__),
            eval_dataset=data,
            data_collator=pad_collator,
        )
        outputs.append((trainer.evaluate()["eval_loss"], trainer.predict(data).predictions))
    (loss, predictions), (neq_loss, neq_predictions) = outputs
    assert neq_loss == loss and (neq_predictions == predictions).all()

    trainer.train_dataset = token_dataset(96)
    trainer.neq_config.holdout_size = 16
    trainer.neq_config.check_every = 2
    trainer.train()
    assert len(trainer.neq_dataset) == 16 and len(trainer.train_dataset) == 96  # the probes stay in training
    assert len(trainer.neq_callback.tracker.history) == 7


def neq_off_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("NEq is off for this run")]


def test_training_set_too_small_for_a_held_out_split(tmp_path, caplog):
    """8 samples leave no room for a held-out split: one warning, then exactly the Trainer's run."""
    tiny = token_dataset(8)
    plain = trained(Trainer, tmp_path, "bert", train=tiny, max_steps=4)
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        neq = trained(NEqTrainer, tmp_path, "bert", NEqConfig(min_loss_drop=0), train=tiny, max_steps=4)
    (message,) = neq_off_warnings(caplog)
    assert "no room for a held-out split" in message and "training set (8 samples)" in message
    assert "strict=True" in message and len(neq.train_dataset) == 8
    assert_same_weights(plain.model, neq.model)
    assert neq.neq_summary() == {}
    with pytest.raises(ValueError, match="no room for a held-out split"):
        make(NEqTrainer, tmp_path, "bert", NEqConfig(min_loss_drop=0, strict=True), train=tiny)


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize(
    "case", [{"max_steps": 1}, {"max_steps": 12, "check_every": 10}], ids=["max_steps_1", "one_check"]
)
def test_run_too_short_for_two_checks(tmp_path, caplog, model_type, case):
    """`max_steps=1` (a common smoke test) or a single check: one warning naming what NEq needed, then exactly the
    Trainer's run, on every training sample."""
    config = NEqConfig(min_loss_drop=0, check_every=case.get("check_every", "auto"), holdout_size=16)
    plain = trained(Trainer, tmp_path, model_type, max_steps=case["max_steps"])
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        neq = trained(NEqTrainer, tmp_path, model_type, config, max_steps=case["max_steps"])
    (message,) = neq_off_warnings(caplog)
    assert "a decision needs 2" in message
    assert len(neq.train_dataset) == 96 and neq.state.global_step == case["max_steps"]
    assert_same_weights(plain.model, neq.model)
    assert all(p.requires_grad for p in neq.model.parameters())

    strict = dataclasses.replace(config, strict=True)
    refused = make(NEqTrainer, tmp_path, model_type, strict, max_steps=case["max_steps"])
    with pytest.raises(ValueError, match="NEq cannot act in this run.*a decision needs 2"):
        refused.train()
