"""A user's worst day: interrupted runs leave the model intact, resume refuses another held-out split or another
model, corrupt state files are named, held-out samples that are trained on are reported, one callback serves two
Trainers, unsupported models are named first, and collapsed runs are flagged."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import pad_collator, paper_rule, tiny_classifier, tiny_config, token_dataset, training_args
from torch import nn
from transformers import Trainer, TrainerCallback

from neq_hf import NEq, NEqConfig, NEqTrainer, NEqTrainerCallback, split_holdout
from neq_hf.freezing import Freezer
from neq_hf.units import discover_units


def neq_trainer(tmp_path, config, model=None, **overrides):
    return NEqTrainer(
        model=model or tiny_classifier("bert"),
        args=training_args(tmp_path / "out", **overrides),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=config,
    )


class Interrupt(TrainerCallback):
    """Raises ``error`` at the end of optimizer step ``at``."""

    def __init__(self, at: int, error: BaseException):
        self.at, self.error = at, error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise self.error


def assert_released(model: nn.Module, flags: list[bool], hooks: list[int]) -> None:
    assert [p.requires_grad for p in model.parameters()] == flags
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__, f"{name} is still patched"
        assert not any(k.startswith("_neq_") for k in module.__dict__), name
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


# -- item 6: an interrupted train() --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "eps, error",
    [(10.0, KeyboardInterrupt()), (5e-3, RuntimeError("boom"))],
    ids=["all_frozen-keyboard", "partly_frozen-exception"],
)
def test_interrupted_train_leaves_the_model_as_it_was(tmp_path, eps, error):
    # eps=10 freezes every unit at step 4 (no gradients, a backward stop); eps=5e-3 freezes rows of some weights
    # (patched forwards): both are in place at step 7, when the run is interrupted
    trainer = neq_trainer(
        tmp_path,
        NEqConfig(min_loss_drop=0, criterion="absolute", eps=eps, granularity="unit", check_every=2, holdout_size=16),
        tiny_classifier("bert", seed=3),
        learning_rate=3e-3,
    )
    model = trainer.model
    flags, hooks = [p.requires_grad for p in model.parameters()], hook_counts(model)
    applied = []

    class Stopper(Interrupt):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.at:
                frozen = sum(not p.requires_grad for p in model.parameters())
                applied.append((frozen, sum("_neq_dense_forward" in m.__dict__ for m in model.modules())))
            super().on_step_end(args, state, control, **kwargs)

    stopper = Stopper(7, error)
    trainer.add_callback(stopper)
    with pytest.raises(type(error)):
        trainer.train()
    assert applied[0][0] > 0 if eps == 10.0 else applied[0][1] > 0, applied  # NEq was applied when interrupted
    assert_released(model, flags, hooks)

    trainer.remove_callback(stopper)
    trainer.train()  # a retry runs from scratch, no recursion through a doubly patched forward
    assert trainer.state.global_step == 12 and len(trainer.neq_callback.tracker.history) == 7
    assert_released(model, flags, hooks)

    # A plain Trainer afterwards updates every weight.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(
        model=model,
        args=training_args(tmp_path / "plain", max_steps=2),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
    ).train()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_interrupted_plain_trainer_run_is_undone_by_the_next_run(tmp_path):
    """With a plain Trainer nothing catches the exception: the callback undoes the interrupted run when the next run
    of that model begins (or on `callback.close()`)."""
    model = tiny_classifier("bert")
    flags, hooks = [p.requires_grad for p in model.parameters()], hook_counts(model)
    train, held = split_holdout(token_dataset(96), 16, seed=0)
    calls = [0]

    def failing_collator(features):  # fails while building the 8th batch
        calls[0] += 1
        if calls[0] == 8:
            raise OSError("disk gone")
        return pad_collator(features)

    # eps=10 freezes every unit at step 4: the interrupted run leaves them without gradients
    callback = NEqTrainerCallback(
        paper_rule(eps=10.0, check_every=2),
        neq_dataset=held,
        data_collator=pad_collator,
    )
    first = Trainer(
        model=model, args=training_args(tmp_path / "a"), train_dataset=train, data_collator=failing_collator
    )
    first.add_callback(callback)
    with pytest.raises(OSError):
        first.train()
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layer." in n), "NEq was applied"

    second = Trainer(model=model, args=training_args(tmp_path / "b"), train_dataset=train, data_collator=pad_collator)
    second.add_callback(callback)
    second.train()
    assert_released(model, flags, hooks)
    assert callback.summary(model)["checks"] == 6


def test_patching_is_idempotent_across_freezers():
    model = tiny_classifier("bert").eval()
    x = {"input_ids": torch.randint(1, 96, (2, 7))}
    dense = model(**x).logits
    units = discover_units(model)
    active = {(0, "neurons"): torch.tensor([True, False] * 18 + [True])}  # some rows frozen: the layer is patched
    first, second = Freezer(model, units), Freezer(model, units)
    first.apply(active)
    second.apply(active)  # a second Freezer (a retried run) on a still patched model
    intermediate = model.bert.encoder.layer[0].intermediate.dense
    assert intermediate._neq_dense_forward.__func__ is nn.Linear.forward
    with torch.enable_grad():
        torch.testing.assert_close(model(**x).logits, dense)
    second.release()
    assert "forward" not in intermediate.__dict__ and "_neq_active" not in intermediate.__dict__
    first.release()  # releasing again is harmless
    torch.testing.assert_close(model(**x).logits, dense)


# -- item 7: resume against another held-out split or another model --------------------------------------------------
def _run(tmp_path, name, config, resume=None, model=None):
    trainer = neq_trainer(
        tmp_path / name,
        config,
        model=model or tiny_classifier("bert", seed=3),
        save_strategy="steps",
        save_steps=6,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    _run(
        tmp,
        "full",
        paper_rule(
            eps=2e-3,
            check_every=2,
            holdout_size=16,
        ),
    )
    return tmp / "full" / "out" / "checkpoint-6"


@pytest.mark.parametrize(
    "change, named",
    [
        ({"holdout_seed": 7}, "holdout_seed 42 -> 7"),
        ({"holdout_size": 24}, "samples: 16 saved, 24 now"),
        ({"holdout_group_by_length": False}, "order: 'length' saved, 'dataset' now"),
    ],
    ids=["seed", "larger", "order"],
)
def test_resume_refuses_another_held_out_split(tmp_path, saved_run, change, named):
    config = NEqConfig(
        min_loss_drop=0, **{"criterion": "absolute", "eps": 2e-3, "check_every": 2, "holdout_size": 16, **change}
    )
    model = tiny_classifier("bert", seed=3)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="held-out split differs") as err:
        _run(tmp_path, "resumed", config, resume=str(saved_run), model=model)
    assert named in str(err.value) and "neq_state_rank*.pt" in str(err.value)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_resume_with_another_eps_is_logged_and_proceeds(tmp_path, saved_run, caplog):
    config = paper_rule(
        eps=3e-3,
        check_every=3,
        holdout_size=16,
    )
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        resumed = _run(tmp_path, "resumed", config, resume=str(saved_run))
    assert "resuming with changed settings (eps 0.002 -> 0.003, check_every 2 -> 3)" in caplog.text
    assert [h["step"] for h in resumed.neq_callback.tracker.history][-2:] == [9, 12]


def _engine(model, config=None, held=None):
    held = held if held is not None else token_dataset(16, seed=4, with_labels=False)
    return NEq(model, config or NEqConfig(min_loss_drop=0, check_every=2), held, data_collator=pad_collator)


def test_resume_refuses_the_state_of_another_architecture(tmp_path):
    """A Llama's NEq state has the same unit counts as this BERT's (2 layers, 4 heads of 8, 37 neurons)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    llama = _engine(AutoModelForCausalLM.from_config(tiny_config("llama"))).setup(max_steps=12)
    llama.save_checkpoint(str(tmp_path))
    bert = _engine(tiny_classifier("bert"))
    assert [t.shape for t in bert.tracker.phi.values()] == [t.shape for t in llama.tracker.phi.values()]
    with pytest.raises(ValueError, match="other units than this model's") as err:
        bert.load_checkpoint(str(tmp_path))
    assert "model_type: 'llama' saved, 'bert' now" in str(err.value)
    with pytest.raises(ValueError, match="other units"):
        bert.load_state_dict(llama.state_dict())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_state_file_is_named(tmp_path, damage):
    model = tiny_classifier("bert")
    _engine(model).setup(max_steps=12).save_checkpoint(str(tmp_path))
    path = tmp_path / "neq_state_rank0.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        _engine(model).load_checkpoint(str(tmp_path))
    message = str(err.value)
    assert str(path) in message and "truncated or corrupt" in message and "delete the NEq state files" in message
    path.unlink()  # the way out the message gives: resume without it
    assert _engine(model).load_checkpoint(str(tmp_path)) is False


# -- item 11: a held-out split that is trained on ---------------------------------------------------------------------
def test_held_out_split_that_is_trained_on_is_reported(tmp_path, caplog):
    data = token_dataset(96)

    def trainer(neq_dataset, train=data):
        return NEqTrainer(
            model=tiny_classifier("bert"),
            args=training_args(tmp_path / "out", max_steps=4),
            train_dataset=train,
            data_collator=pad_collator,
            neq_dataset=neq_dataset,
            neq_config=NEqConfig(min_loss_drop=0, check_every=2),
        )

    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        trainer(data)  # the very same object: said at construction
    assert "is the training set itself (96 samples): every check runs a forward pass over all of it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neq_hf"):
        trainer(data.select(range(16))).train()  # 16 of its samples: found when training begins (allowed: said)
    assert "about 100% of the held-out samples (neq_dataset) are also trained on" in caplog.text
    assert "is the training set itself" not in caplog.text
    caplog.clear()
    train, held = split_holdout(data, 16, seed=0)
    with caplog.at_level(logging.INFO, logger="neq_hf"):
        trainer(held, train).train()
        neq_trainer(tmp_path, NEqConfig(min_loss_drop=0, check_every=2, holdout_size=16), max_steps=4).train()
    assert "trained on" not in caplog.text


# -- item 12: one callback, two trainers -------------------------------------------------------------------------------
def test_one_callback_shared_by_two_trainers_keeps_each_run(tmp_path):
    import json

    train, held = split_holdout(token_dataset(96), 16, seed=0)
    callback = NEqTrainerCallback(
        paper_rule(eps=2e-3, check_every=2),
        neq_dataset=held,
    )
    trainers = []
    for name, steps in (("a", 8), ("b", 12)):
        trainer = Trainer(
            model=tiny_classifier("bert", seed=len(trainers)),
            args=training_args(tmp_path / name, max_steps=steps),
            train_dataset=train,
            data_collator=pad_collator,
        )
        trainer.add_callback(callback)
        trainers.append(trainer)
    a, b = trainers
    a.train()
    summary_a = callback.summary(a.model)
    b.train()
    assert callback.summary(a.model) == summary_a and summary_a["checks"] == 4
    assert callback.summary(b.model)["checks"] == 6 and callback.summary()["checks"] == 6  # the latest run
    with open(tmp_path / "a" / "neq_history.json") as f:
        assert json.load(f)["summary"]["checks"] == 4


# -- item 15: an unsupported model is named first ----------------------------------------------------------------------
def test_unsupported_model_is_named_before_the_held_out_data(tmp_path):
    from datasets import Dataset

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(96, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, input_x=None, labels=None):
            logits = self.head(self.emb(input_x).mean(1))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    rows = Dataset.from_list([{"input_x": [1, 2, 3], "labels": 1}] * 40)

    def collate(features):
        return {
            "input_x": torch.tensor([f["input_x"] for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    trainer = NEqTrainer(
        model=Toy(),
        args=training_args(tmp_path / "out", remove_unused_columns=False),
        train_dataset=rows,
        neq_dataset=rows.select(range(8)),
        data_collator=collate,
        neq_config=NEqConfig(min_loss_drop=0, check_every=2),
    )
    with pytest.raises(ValueError, match="NEq cannot find the attention heads"):
        trainer.train()


# -- issue 10 item 3: guard rails against a collapsed run ------------------------------------------------------------
def test_collapse_scenario_is_flagged(tmp_path, caplog):
    """The paper's absolute rule at eps=0.1: nearly every unit freezes at the first decision and the loss stays at
    ln 2."""
    trainer = neq_trainer(
        tmp_path, NEqConfig(min_loss_drop=0, criterion="absolute", eps=1e-1, check_every=2, holdout_size=16)
    )
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        trainer.train()
    assert "while the training loss has not moved from its start" in caplog.text
    assert "lower NEqConfig.eps (now 0.1) or use criterion='relative'" in caplog.text
    assert "raise NEqConfig.holdout_size (the held-out split has 16 samples)" in caplog.text
    (stalled,) = [h for h in trainer.state.log_history if "stopped learning" in h.get("neq/warning", "")]
    assert stalled["step"] == 9  # the loss logged at step 8 showed it; logged with the next step
    assert any("stopped learning" in w for w in trainer.neq_summary()["warnings"])


def test_everything_frozen_at_the_first_decision_is_flagged(tmp_path, caplog):
    trainer = neq_trainer(
        tmp_path, NEqConfig(min_loss_drop=0, criterion="absolute", eps=10.0, check_every=2, holdout_size=16)
    )
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        trainer.train()
    assert trainer.neq_callback.tracker.history[2]["frozen_fraction"] == 1.0
    assert "100% of units froze at the first decision (check 2, step 4)" in caplog.text
    assert "lower NEqConfig.eps (now 10)" in caplog.text
    first = [h for h in trainer.state.log_history if "neq/warning" in h][0]
    assert first["step"] == 4 and "first decision" in first["neq/warning"] and "neq/frozen_fraction" in first


@pytest.mark.parametrize("rule", ["absolute", "default"])
def test_healthy_run_is_not_flagged(tmp_path, caplog, rule):
    config = NEqConfig(min_loss_drop=0, check_every=2, holdout_size=16)
    if rule == "absolute":
        config = NEqConfig(
            min_loss_drop=0, criterion="absolute", eps=1e-3, granularity="unit", check_every=2, holdout_size=16
        )
    trainer = neq_trainer(tmp_path, config)
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        trainer.train()
    if rule == "absolute":  # something freezes, not most units
        assert 0 < max(h["frozen_fraction"] for h in trainer.neq_callback.tracker.history) < 0.8
    assert "neq/warning" not in str(trainer.state.log_history) and "froze" not in caplog.text
    assert "not moved" not in caplog.text and "warnings" not in trainer.neq_summary()


@pytest.mark.parametrize("losses, fires", [([0.70, 0.69, 0.70, 0.69], True), ([0.70, 0.60, 0.50, 0.40], False)])
def test_flat_loss_with_most_units_frozen_is_flagged(caplog, losses, fires):
    """Custom-loop API: the loss goes with `step_end`. With the model unchanged every unit is at equilibrium (phi 1,
    velocity 0), so eps=1e-6 freezes all of them at the first decision (step 4)."""
    neq = _engine(
        tiny_classifier("bert"),
        paper_rule(eps=1e-6, check_every=2),
    ).setup(max_steps=12)
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        for step, loss in zip((2, 4, 6, 8), losses):
            neq.step_end(step, loss=loss)
    assert neq.tracker.history[2]["frozen_fraction"] == 1.0
    flagged = "while the training loss has not moved from its start (0.7 -> 0.7)" in caplog.text
    assert flagged is fires
    assert ("not moved" in neq.pop_logs().get("neq/warning", "")) is fires
