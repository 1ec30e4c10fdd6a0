"""NEqTrainer / NEqTrainerCallback inside the Trainer: exact freezing, schedules, logging, resume, bad input."""

import json
import os

import pytest
import torch
from conftest import pad_collator, paper_rule, tiny_classifier, token_dataset, training_args
from transformers import Trainer, TrainerCallback

from neq_hf import NEqConfig, NEqTrainer, NEqTrainerCallback, split_holdout
from neq_hf.tracker import EquilibriumTracker


def make_trainer(tmp_path, neq=None, model=None, **arg_overrides):
    neq = neq or paper_rule(
        eps=1e-3,
        check_every=2,
        holdout_size=16,
    )
    return NEqTrainer(
        model=model or tiny_classifier("bert"),
        args=training_args(tmp_path / "out", **arg_overrides),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=neq,
    )


@pytest.fixture
def random_masks(monkeypatch):
    """From the third check on, replace the decisions by random masks (new each check), to drive freezing and
    releasing of arbitrary row patterns through real training steps."""
    original = EquilibriumTracker.check
    gen = torch.Generator().manual_seed(0)

    def check(self, *args, **kwargs):
        figures = original(self, *args, **kwargs)
        if self.t >= 3:
            for key, mask in self.frozen.items():
                self.frozen[key] = torch.rand(mask.shape, generator=gen) < 0.5
            if self.t == 4:  # one check with a fully frozen first layer: the backward stop is exercised too
                for key in self.frozen:
                    if key[0] == 0:
                        self.frozen[key] = torch.ones_like(self.frozen[key])
        return figures

    monkeypatch.setattr(EquilibriumTracker, "check", check)


class ExactnessChecker(TrainerCallback):
    """Around every optimizer step: frozen tensors and frozen rows (and their optimizer state) must not change."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.checked_rows = 0
        self.checked_tensors = 0
        self.changed_active = 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        freezer = self.trainer.neq_callback.freezer
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.before = {id(p): p.detach().clone() for p in freezer.managed.values()}
        self.state_before = {
            id(p): {k: v.clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
            for p in freezer.managed.values()
        }
        self.frozen_tensors = [p for p in freezer.managed.values() if not p.requires_grad]
        self.partials = [(q.param, q.dim, q.frozen.clone()) for q in freezer._partials]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        for p in self.frozen_tensors:
            assert torch.equal(p, self.before[id(p)]), "a fully frozen tensor changed"
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and k in self.state_before[id(p)]:
                    assert torch.equal(v, self.state_before[id(p)][k]), f"optimizer state {k} of a frozen tensor moved"
            self.checked_tensors += 1
        for p, dim, rows in self.partials:
            now, was = p.detach().index_select(dim, rows), self.before[id(p)].index_select(dim, rows)
            assert torch.equal(now, was), "a frozen row changed"
            for k, v in opt.state.get(p, {}).items():
                old = self.state_before[id(p)].get(k)
                if torch.is_tensor(v) and v.shape == p.shape and old is not None:
                    assert torch.equal(v.index_select(dim, rows), old.index_select(dim, rows)), f"{k} of frozen rows"
            active = torch.ones(p.shape[dim], dtype=torch.bool)
            active[rows] = False
            if not torch.equal(
                p.detach()[(slice(None),) * dim + (active,)], self.before[id(p)][(slice(None),) * dim + (active,)]
            ):
                self.changed_active += 1
            self.checked_rows += rows.numel()


OPTIMIZER_CASES = {
    "fused_adamw_wd": dict(optim="adamw_torch_fused", weight_decay=0.1),
    "adamw_accum_warmup": dict(
        optim="adamw_torch",
        weight_decay=0.01,
        gradient_accumulation_steps=2,
        warmup_steps=3,
        lr_scheduler_type="cosine",
    ),
    "sgd_momentum": dict(optim="sgd", optim_args="momentum=0.9", weight_decay=0.01, learning_rate=0.05),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_frozen_parameters_stay_bit_identical(tmp_path, random_masks, case):
    trainer = make_trainer(
        tmp_path,
        paper_rule(
            eps=0.0,
            check_every=2,
            holdout_size=16,
        ),
        max_steps=14,
        **OPTIMIZER_CASES[case],
    )
    checker = ExactnessChecker(trainer)
    trainer.add_callback(checker)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert checker.checked_rows > 0 and checker.checked_tensors > 0
    assert checker.changed_active > 0, "active rows of partly frozen tensors must keep training"
    after = dict(trainer.model.named_parameters())
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])


def test_frozen_rows_exact_with_dense_weight_gradients(tmp_path, random_masks):
    neq = paper_rule(
        eps=0.0,
        check_every=2,
        holdout_size=16,
        row_sparse_min_frozen=1.0,
    )
    trainer = make_trainer(tmp_path, neq, max_steps=10, weight_decay=0.1)
    checker = ExactnessChecker(trainer)
    trainer.add_callback(checker)
    trainer.train()
    assert checker.checked_rows > 0 and checker.changed_active > 0


def test_sgd_momentum_optimizer_state_is_paused(tmp_path, random_masks):
    trainer = make_trainer(
        tmp_path,
        paper_rule(
            eps=0.0,
            check_every=2,
            holdout_size=16,
        ),
        max_steps=10,
    )
    opt = torch.optim.SGD(trainer.model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    trainer.optimizer = opt
    checker = ExactnessChecker(trainer)
    trainer.add_callback(checker)
    trainer.train()
    assert checker.checked_rows > 0


def test_eps_zero_freezes_nothing(tmp_path):
    trainer = make_trainer(
        tmp_path,
        paper_rule(
            eps=0.0,
            check_every=2,
            holdout_size=16,
        ),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    summary = trainer.neq_summary()
    assert summary["final_frozen_fraction"] == 0.0 and summary["checks"] == 6
    for n, p in trainer.model.named_parameters():
        if "encoder.layer" in n and "weight" in n:
            assert not torch.equal(p, before[n]), n


def test_huge_eps_freezes_everything_after_warmup(tmp_path):
    trainer = make_trainer(
        tmp_path,
        paper_rule(
            eps=10.0,
            warmup=2,
            check_every=2,
            holdout_size=16,
        ),
    )
    snaps = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snaps[state.global_step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    trainer.add_callback(Snap())
    trainer.train()
    history = trainer.neq_callback.tracker.history
    # reference at step 0; checks 1..warmup decide nothing; check warmup+1 (step 6) freezes every unit
    assert [h["frozen_fraction"] for h in history[:4]] == [0.0, 0.0, 0.0, 1.0]
    assert history[3]["step"] == 6 and history[3]["backward_stops_at_layer"] == 2
    last, frozen_at = snaps[12], snaps[6]
    for n, p in last.items():
        if n.startswith("bert.encoder") or n.startswith("bert.embeddings"):
            assert torch.equal(p, frozen_at[n]), n
        if n.startswith("classifier"):
            assert not torch.equal(p, frozen_at[n]), n
    # after training every parameter is trainable again
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_event_order_and_schedule_independent_of_eval(tmp_path):
    events = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            events.append(("step", state.global_step))

        def on_evaluate(self, args, state, control, **kwargs):
            events.append(("eval", state.global_step))

    trainer = NEqTrainer(
        model=tiny_classifier("bert"),
        args=training_args(tmp_path / "out", eval_strategy="steps", eval_steps=5, max_steps=9),
        train_dataset=token_dataset(96),
        eval_dataset=token_dataset(16, seed=1),
        data_collator=pad_collator,
        neq_config=NEqConfig(min_loss_drop=0, check_every=3, holdout_size=16),
    )
    trainer.add_callback(Recorder())
    trainer.train()
    steps = [h["step"] for h in trainer.neq_callback.tracker.history]
    assert steps == [0, 3, 6, 9]  # the reference before the first step, then every 3 optimizer steps
    assert ("eval", 5) in events
    assert trainer.neq_callback.tracker.history[0]["check"] == 0


def test_epoch_schedule(tmp_path):
    trainer = make_trainer(
        tmp_path, NEqConfig(min_loss_drop=0, check_every="epoch", holdout_size=16), max_steps=-1, num_train_epochs=3
    )
    trainer.train()
    steps = [h["step"] for h in trainer.neq_callback.tracker.history]
    assert len(steps) == 4 and steps[0] == 0 and steps[-1] == trainer.state.global_step


def test_figures_are_logged_and_written(tmp_path):
    trainer = make_trainer(
        tmp_path,
        paper_rule(
            eps=10.0,
            check_every=4,
            holdout_size=16,
        ),
        logging_steps=100,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "neq/frozen_fraction" in h]
    assert [h["step"] for h in logged] == [4, 8, 12]
    assert logged[-1]["neq/frozen_fraction"] == 1.0
    assert "neq/frozen_fraction/heads" in logged[-1] and "neq/neurons/layer_1" in logged[-1]
    with open(os.path.join(trainer.args.output_dir, "neq_history.json")) as f:
        saved = json.load(f)
    assert saved["config"]["eps"] == 10.0 and len(saved["checks"]) == 4
    assert saved["summary"]["final_frozen_fraction"] == 1.0


def test_holdout_is_removed_from_training(tmp_path):
    trainer = make_trainer(tmp_path, NEqConfig(min_loss_drop=0, holdout_size=10, holdout_in_train=False))
    assert len(trainer.train_dataset) == 86 and len(trainer.neq_dataset) == 10
    train_ids = {tuple(x) for x in trainer.train_dataset["input_ids"]}
    assert not any(tuple(x) in train_ids for x in trainer.neq_dataset["input_ids"])
    assert not trainer.neq_holdout_in_train
    again = make_trainer(tmp_path, NEqConfig(min_loss_drop=0, holdout_size=10))  # the default keeps them
    assert again.neq_dataset["input_ids"] == trainer.neq_dataset["input_ids"]
    assert len(again.train_dataset) == 96 and again.neq_holdout_in_train


def test_holdout_in_train_is_the_plain_run_until_something_freezes(tmp_path):
    """holdout_in_train=True keeps the training set (and its batch order) of the plain Trainer run; the held-out
    checks draw nothing from the global RNG, so with nothing ever at rest (eps_relative=0) the run is the plain
    run bit for bit, dropout included."""
    plain = Trainer(
        model=tiny_classifier("bert"),
        args=training_args(tmp_path / "plain"),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
    )
    assert plain.model.config.hidden_dropout_prob > 0  # the dropout masks must match too
    plain.train()
    cfg = NEqConfig(eps_relative=0.0, min_loss_drop=0, check_every=2, holdout_size=16, holdout_in_train=True)
    neq = NEqTrainer(
        model=tiny_classifier("bert"),
        args=training_args(tmp_path / "neq"),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=cfg,
    )
    assert len(neq.train_dataset) == 96 and len(neq.neq_dataset) == 16
    train_ids = [tuple(x) for x in neq.train_dataset["input_ids"]]
    assert all(tuple(x) in train_ids for x in neq.neq_dataset["input_ids"])
    neq.train()
    summary = neq.neq_summary()
    assert summary["checks"] == 6 and summary["final_frozen_fraction"] == 0.0 and summary["holdout_in_train"]
    mine = dict(neq.model.named_parameters())
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, mine[name]), name
    # removed from training, the data differ, and so does the run
    removed = make_trainer(
        tmp_path,
        NEqConfig(eps_relative=0.0, min_loss_drop=0, check_every=2, holdout_size=16, holdout_in_train=False),
    )
    removed.train()
    assert not torch.equal(removed.model.classifier.weight, plain.model.classifier.weight)


def test_plain_trainer_with_callback(tmp_path):
    train, held = split_holdout(token_dataset(96), 16, seed=0)
    trainer = Trainer(
        model=tiny_classifier("bert"),
        args=training_args(tmp_path / "out", logging_steps=3),
        train_dataset=train,
        data_collator=pad_collator,
    )
    callback = NEqTrainerCallback(
        paper_rule(
            eps=10.0,
            check_every=3,
            holdout_size=16,
        ),
        neq_dataset=held,
    )
    trainer.add_callback(callback)
    trainer.train()
    assert callback.summary()["final_frozen_fraction"] == 1.0
    assert any("neq/frozen_fraction" in h for h in trainer.state.log_history)


def _resume_run(tmp_path, name, resume=None, max_steps=12):
    trainer = make_trainer(
        tmp_path / name,
        paper_rule(
            eps=2e-3,
            check_every=2,
            holdout_size=16,
        ),
        model=tiny_classifier("bert", seed=3),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=6,
        learning_rate=3e-3,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_matches_uninterrupted_run(tmp_path):
    full = _resume_run(tmp_path, "full")
    ckpt = tmp_path / "full" / "out" / "checkpoint-6"
    assert (ckpt / "neq_state_rank0.pt").is_file() and (ckpt / "neq_config.json").is_file()
    resumed = _resume_run(tmp_path, "resumed", resume=str(ckpt))
    masks_full, masks_resumed = full.neq_callback.tracker.frozen, resumed.neq_callback.tracker.frozen
    assert any(m.any() for m in masks_full.values()), "the scenario should freeze something"
    for key in masks_full:
        assert torch.equal(masks_full[key], masks_resumed[key]), key
    params_resumed = dict(resumed.model.named_parameters())
    for n, p in full.model.named_parameters():
        assert torch.equal(p, params_resumed[n]), n
    assert len(resumed.neq_callback.tracker.history) == len(full.neq_callback.tracker.history)


# -- bad input ----------------------------------------------------------------------------------------------------
def test_tiny_holdout_fraction_is_raised_to_the_floor(tmp_path):
    # 0.001 x 96 rounds to 0: raised to holdout_min_samples as far as 20% of train allows (empty splits: test_holdout)
    assert len(make_trainer(tmp_path, NEqConfig(min_loss_drop=0, holdout_size=0.001)).neq_dataset) == 19


def test_holdout_larger_than_train(tmp_path):
    with pytest.raises(ValueError, match="not smaller than the training set"):
        make_trainer(tmp_path, NEqConfig(min_loss_drop=0, holdout_size=500))


def test_holdout_without_model_inputs(tmp_path):
    from datasets import Dataset

    trainer = NEqTrainer(
        model=tiny_classifier("bert"),
        args=training_args(tmp_path / "out"),
        train_dataset=token_dataset(64),
        data_collator=pad_collator,
        neq_dataset=Dataset.from_list([{"text": "hello", "label": 1}] * 4),
        neq_config=NEqConfig(min_loss_drop=0, check_every=2),
    )
    with pytest.raises(ValueError, match="needs one of"):
        trainer.train()


def test_check_every_larger_than_run_fails_before_training(tmp_path):
    # strict: otherwise NEq warns and the run is a plain Trainer run (tests/test_upstream_compat.py)
    trainer = make_trainer(tmp_path, NEqConfig(min_loss_drop=0, check_every=50, holdout_size=16, strict=True))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="check_every=50"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_callback_without_dataset(tmp_path):
    trainer = Trainer(
        model=tiny_classifier("bert"),
        args=training_args(tmp_path / "o"),
        train_dataset=token_dataset(32),
        data_collator=pad_collator,
    )
    trainer.add_callback(NEqTrainerCallback(NEqConfig(min_loss_drop=0, check_every=2)))
    with pytest.raises(ValueError, match="split_holdout"):
        trainer.train()


def test_non_finite_outputs_are_reported_and_not_frozen(tmp_path, caplog):
    model = tiny_classifier("bert")

    def poison(module, args, output):
        return output if module.training else output * float("nan")

    model.bert.encoder.layer[1].intermediate.dense.register_forward_hook(poison)
    trainer = make_trainer(
        tmp_path,
        paper_rule(
            eps=10.0,
            check_every=2,
            holdout_size=16,
        ),
        model=model,
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    history = trainer.neq_callback.tracker.history
    assert history[-1]["nonfinite_units"] > 0
    assert history[-1]["per_layer/neurons"][1] == 0.0 and history[-1]["per_layer/heads"][0] == 1.0
    assert "non-finite" in caplog.text


def test_unsupported_model(tmp_path):
    from torch import nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(96, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, input_ids=None, attention_mask=None, labels=None):
            logits = self.head(self.emb(input_ids).mean(1))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    trainer = make_trainer(tmp_path, NEqConfig(min_loss_drop=0, check_every=2, holdout_size=16), model=Toy())
    with pytest.raises(ValueError, match="register_architecture"):
        trainer.train()


def test_auto_schedule_makes_twenty_checks(tmp_path):
    config = NEqConfig(min_loss_drop=0, check_every="auto", holdout_size=16, check_budget=0)
    trainer = make_trainer(tmp_path, config, max_steps=40)
    trainer.train()
    steps = [h["step"] for h in trainer.neq_callback.tracker.history]
    assert steps == list(range(0, 41, 2))  # the reference, then every 5% of the run
    assert trainer.neq_summary()["check_every"] == 2


def test_auto_schedule_keeps_the_checks_within_their_budget(tmp_path):
    # 16 held-out samples read once against batches of 8 read forward and backward: a check costs 2/3 of a step,
    # so checks every 2 steps would cost a third of the run; every 3 steps keeps them within check_budget=0.25
    trainer = make_trainer(tmp_path, NEqConfig(min_loss_drop=0, holdout_size=16), max_steps=40)
    trainer.train()
    assert [h["step"] for h in trainer.neq_callback.tracker.history] == list(range(0, 41, 3))
    summary = trainer.neq_summary()
    assert summary["check_every"] == 3 and summary["check_cost_steps_estimate"] == pytest.approx(16 / 24)
