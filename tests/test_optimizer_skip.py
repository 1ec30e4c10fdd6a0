"""Frozen rows skipped by the optimizer: the masked step on active rows against torch's own optimizers."""

import copy

import pytest
import torch
from conftest import pad_collator, paper_rule, tiny_classifier, token_dataset, training_args
from transformers import TrainerCallback

from neq_hf import Freezer, NEqTrainer, discover_units, freezing
from neq_hf.freezing import _masked_kind
from neq_hf.tracker import EquilibriumTracker

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_foreach_amsgrad_maximize": lambda ps: torch.optim.AdamW(
        ps, lr=1e-2, weight_decay=0.1, foreach=True, amsgrad=True, maximize=True
    ),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, foreach=True),
    "sgd_plain": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
}


def _random_masks(units, gen, frac):
    return {
        (layer.index, kind): torch.rand(layer.num_units(kind), generator=gen) >= frac
        for layer in units.layers
        for kind in ("heads", "neurons")
    }


def _row_mask(param, dim, frozen):
    mask = torch.zeros(param.shape[dim], dtype=torch.bool)
    mask[frozen] = True
    shape = [1] * param.dim()
    shape[dim] = -1
    return mask.view(shape).expand_as(param)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_step_gives_active_rows_what_torch_gives_them(name):
    """Same gradients into a NEq model and a reference copy stepped whole by torch, whose frozen rows (and their
    optimizer state) are put back by hand after each step: parameters and state equal bit for bit, through a
    release and re-freeze of rows, and the torch optimizer never sees the skipped tensors' gradients."""
    model = tiny_classifier("bert")
    ref = copy.deepcopy(model)
    units = discover_units(model)
    freezer = Freezer(model, units, masked_min_frozen=0.0)
    opt, ref_opt = OPTIMIZERS[name](list(model.parameters())), OPTIMIZERS[name](list(ref.parameters()))
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    seen_by_torch = []
    opt.register_step_pre_hook(lambda *_: seen_by_torch.append([q.param.grad is None for q in freezer._partials]))
    gen = torch.Generator().manual_seed(0)
    phases = [None, _random_masks(units, gen, 0.5), _random_masks(units, gen, 0.5), _random_masks(units, gen, 0.9)]
    masked_steps = 0
    paused_then_released = 0
    for masks in phases:
        if masks is None:
            freezer.release()  # first steps: nothing frozen, the optimizers create their state
        else:
            frozen_before = {id(q.param): q.frozen for q in freezer._partials}
            freezer.apply(masks)
        by_name = {n: q for q in freezer._partials for n, p in params.items() if p is q.param}
        for _ in range(3):
            grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items() if p.requires_grad}
            for n, g in grads.items():
                q = by_name.get(n)
                if q is not None:
                    g.masked_fill_(_row_mask(g, q.dim, q.frozen), 0)  # what the row-sparse backward gives
                params[n].grad, ref_params[n].grad = g.clone(), g.clone()
            for n, p in ref_params.items():
                if n not in grads:
                    p.grad = None
            saved = {
                n: (ref_params[n].detach().clone(), copy.deepcopy(ref_opt.state.get(ref_params[n], {})))
                for n in by_name
            }

            freezer.before_optimizer_step(opt)
            opt.step()
            freezer.after_optimizer_step(opt)
            ref_opt.step()
            with torch.no_grad():
                for n, q in by_name.items():
                    rows = _row_mask(ref_params[n], q.dim, q.frozen)
                    ref_params[n].copy_(torch.where(rows, saved[n][0], ref_params[n]))
                    for k, v in ref_opt.state[ref_params[n]].items():
                        if torch.is_tensor(v) and v.shape == ref_params[n].shape:
                            old = saved[n][1].get(k, torch.zeros_like(v))
                            v.copy_(torch.where(rows, old, v))
            if by_name:
                assert all(seen_by_torch[-1]), "the torch optimizer must not step the skipped tensors"
                masked_steps += 1
            for n, p in params.items():
                assert torch.equal(p, ref_params[n]), n
                state, ref_state = opt.state.get(p, {}), ref_opt.state.get(ref_params[n], {})
                assert state.keys() == ref_state.keys(), n
                for k in state:
                    assert torch.equal(state[k], ref_state[k]), (n, k)
                if n in by_name:
                    assert p.grad is not None, "gradients are given back after the step"
        if masks is not None and frozen_before:
            paused_then_released += sum(
                1 for q in freezer._partials if id(q.param) in frozen_before and q.frozen.numel() > 0
            )
    assert masked_steps == 9 and paused_then_released > 0


def test_masked_step_leaves_frozen_rows_and_their_state_untouched():
    """A row frozen after some training keeps its value and its moments while the rest of its tensor trains; once
    released, its first update starts from those moments (no jump from decay while it was frozen)."""
    model = tiny_classifier("bert")
    units = discover_units(model)
    freezer = Freezer(model, units, masked_min_frozen=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    batch = {"input_ids": torch.randint(1, 90, (4, 9)), "labels": torch.tensor([0, 1, 1, 0])}

    def train_step():
        model(**batch).loss.backward()
        freezer.before_optimizer_step(opt)
        opt.step()
        freezer.after_optimizer_step(opt)
        model.zero_grad(set_to_none=True)

    train_step()
    neurons = torch.ones(37, dtype=torch.bool)
    neurons[:30] = False
    freezer.apply({(0, "neurons"): neurons})
    up = units.layers[0].module.intermediate.dense.weight
    state = opt.state[up]
    before = (up.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone(), state["step"].clone())
    for _ in range(4):
        train_step()
    assert torch.equal(up[:30], before[0][:30])
    assert torch.equal(state["exp_avg"][:30], before[1][:30]) and torch.equal(state["exp_avg_sq"][:30], before[2][:30])
    assert not torch.equal(up[30:], before[0][30:]), "active rows train"
    assert state["step"] == before[3] + 4, "the tensor's step counter advances as torch's would"


class MaskedFrom(TrainerCallback):
    """Set the fraction of frozen rows from which a tensor takes the masked step (above 1: never, write-back)."""

    def __init__(self, trainer, fraction):
        self.trainer, self.fraction = trainer, fraction

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.neq_callback.freezer.masked_min_frozen = self.fraction


class CountMasked(TrainerCallback):
    """Count the tensors whose gradient is hidden from the optimizer's own step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.count = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.count += sum(q.grad is not None for q in self.trainer.neq_callback.freezer._partials)


@pytest.fixture
def seeded_masks(monkeypatch):
    """From the second check on, random masks drawn from a generator seeded by the check index (so a resumed run
    draws the same ones), about 60% frozen, with rows released and re-frozen from check to check."""
    original = EquilibriumTracker.check

    def check(self, *args, **kwargs):
        figures = original(self, *args, **kwargs)
        if self.t >= 2:
            gen = torch.Generator().manual_seed(1000 + self.t)
            for key, mask in self.frozen.items():
                self.frozen[key] = torch.rand(mask.shape, generator=gen) < 0.6
        return figures

    monkeypatch.setattr(EquilibriumTracker, "check", check)


CASES = {
    "fused_adamw_wd": dict(optim="adamw_torch_fused", weight_decay=0.1),
    "adamw_accum_warmup_cosine": dict(
        optim="adamw_torch",
        weight_decay=0.01,
        gradient_accumulation_steps=2,
        warmup_steps=3,
        lr_scheduler_type="cosine",
    ),
    "sgd_momentum": dict(optim="sgd", optim_args="momentum=0.9", weight_decay=0.01, learning_rate=0.05),
}


def _run(tmp_path, name, case, write_back=False, resume=None, **overrides):
    trainer = NEqTrainer(
        model=tiny_classifier("bert", seed=3),
        args=training_args(tmp_path / name, max_steps=12, **{**CASES[case], **overrides}),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=paper_rule(
            eps=0.0,
            check_every=2,
            holdout_size=16,
        ),
    )
    counter = CountMasked(trainer)
    trainer.add_callback(counter)
    trainer.add_callback(MaskedFrom(trainer, 2.0 if write_back else 0.0))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, counter.count


@pytest.mark.parametrize("case", sorted(CASES) + ["fused_adamw_wd/small_workspace"])
def test_masked_run_equals_write_back_run(tmp_path, seeded_masks, monkeypatch, case):
    """The whole training run with frozen rows skipped by the optimizer equals, bit for bit, the run that steps
    whole tensors and writes frozen rows back (which gives active rows exactly torch's update)."""
    case, _, variant = case.partition("/")
    if variant == "small_workspace":  # tensors stepped in several batches
        monkeypatch.setattr(freezing, "_WORKSPACE_ELEMENTS", 256)
    masked, n_masked = _run(tmp_path, "masked", case)
    written, n_written = _run(tmp_path, "written", case, write_back=True)
    assert n_masked > 0 and n_written == 0
    ref = dict(written.model.named_parameters())
    for n, p in masked.model.named_parameters():
        assert torch.equal(p, ref[n]), n
    state, ref_state = masked.optimizer.state_dict()["state"], written.optimizer.state_dict()["state"]
    for i in ref_state:
        for k, v in ref_state[i].items():
            assert torch.equal(state[i][k], v), (i, k)


def test_masked_run_resumes_mid_run(tmp_path, seeded_masks):
    full, _ = _run(tmp_path, "full", "fused_adamw_wd", save_strategy="steps", save_steps=6)
    ckpt = tmp_path / "full" / "checkpoint-6"
    resumed, n_masked = _run(tmp_path, "resumed", "fused_adamw_wd", resume=str(ckpt), save_strategy="no")
    assert n_masked > 0
    ref = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, ref[n]), n


def test_unsupported_optimizers_fall_back_to_write_back():
    model = tiny_classifier("bert")
    params = list(model.parameters())
    assert _masked_kind(torch.optim.AdamW(params)) == "adam"
    assert _masked_kind(torch.optim.SGD(params, lr=0.1)) == "sgd"
    assert _masked_kind(torch.optim.RMSprop(params)) is None
    assert _masked_kind(torch.optim.Adam(params, differentiable=True)) is None

    class Wrapped:  # an Accelerate-style wrapper under a gradient scaler, which may skip the step
        def __init__(self, optimizer):
            self.optimizer, self.scaler = optimizer, object()

    assert _masked_kind(Wrapped(torch.optim.AdamW(params))) is None

    units = discover_units(model)
    freezer = Freezer(model, units, masked_min_frozen=0.0)
    opt = torch.optim.RMSprop(params, lr=1e-2, momentum=0.9)
    batch = {"input_ids": torch.randint(1, 90, (4, 9)), "labels": torch.tensor([0, 1, 1, 0])}
    neurons = torch.ones(37, dtype=torch.bool)
    neurons[::2] = False
    for step in range(4):
        if step == 1:
            freezer.apply({(0, "neurons"): neurons})
            up = units.layers[0].module.intermediate.dense.weight
            before = (up.detach().clone(), {k: v.clone() for k, v in opt.state[up].items()})
        model(**batch).loss.backward()
        freezer.before_optimizer_step(opt)
        assert all(q.grad is None for q in freezer._partials)
        opt.step()
        freezer.after_optimizer_step(opt)
        model.zero_grad(set_to_none=True)
    assert torch.equal(up[::2], before[0][::2]) and not torch.equal(up[1::2], before[0][1::2])
    for k, v in opt.state[up].items():
        if v.shape == up.shape:
            assert torch.equal(v[::2], before[1][k][::2]), k
