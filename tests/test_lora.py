"""NEq on peft LoRA models: frozen units freeze their adapter rows, base weights never move, adapters save as usual.

Mapping under test (tiny Llama: 4 query heads of dimension 8 sharing 2 K/V heads, 37 gated MLP neurons):

- q/k/v/gate/up (output units): a frozen head or neuron freezes its rows of ``lora_B``; ``lora_A`` trains while any
  row of the module does, and freezes with the last one;
- o/down (input units): a frozen head or neuron freezes its columns of ``lora_A``; ``lora_B`` freezes with the module.
"""

import pytest
import torch
from conftest import pad_collator, paper_rule, snapshot, tiny_classifier, token_dataset, training_args, unit_mask
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback

from neq_hf import NEqTrainer, NEqTrainerCallback, split_holdout

HD = 8  # head_dim of the tiny decoders
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(targets=LLAMA_TARGETS, **kw):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="SEQ_CLS", **kw)


class FixedMasks(TrainerCallback):
    """Applies hand-made unit masks before every step and records which adapter tensors get a gradient."""

    def __init__(self, neq: NEqTrainerCallback, masks):
        self.neq, self.masks = neq, masks
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.neq.freezer.apply(self.masks)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.neq._model
        self.grads.append({n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()})


def neq_lora_trainer(tmp_path, neq=None, model=None, peft_config=None, **arg_overrides):
    return NEqTrainer(
        model=model if model is not None else tiny_classifier("llama"),
        args=training_args(tmp_path / "out", **arg_overrides),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=neq
        or paper_rule(
            eps=0.0,
            check_every=2,
            holdout_size=16,
        ),
        peft_config=peft_config,
    )


def layer_param(model, layer, path):
    return dict(model.named_parameters())[f"base_model.model.model.layers.{layer}.{path}"]


# Layer 0: query heads 0 and 1 frozen (so K/V head 0, which only they use, is frozen too) and neurons 0, 5, 36 frozen.
# Layer 1: every unit frozen, so each of its adapters freezes whole.
PARTIAL = {
    (0, "heads"): unit_mask(4, [0, 1]),
    (0, "neurons"): unit_mask(37, [0, 5, 36]),
    (1, "heads"): unit_mask(4, range(4)),
    (1, "neurons"): unit_mask(37, range(37)),
}


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("partial")
    trainer = neq_lora_trainer(tmp_path, peft_config=lora_config(), max_steps=6)
    fixed = FixedMasks(trainer.neq_callback, PARTIAL)
    trainer.add_callback(fixed)
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, fixed, before, snapshot(trainer.model)


def test_only_adapters_and_classifier_are_managed(partial_run):
    trainer, _, _, _ = partial_run
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    managed = sorted(names[pid] for pid in trainer.neq_callback.freezer.managed)
    assert managed and all(".lora_" in n or "modules_to_save" in n for n in managed)
    assert any("score.modules_to_save" in n for n in managed)
    layer = trainer.neq_callback.unit_map.layers[0]
    assert [b.name.rsplit(".", 2)[-2:] for b in layer.bindings] == [
        [p.split(".")[1], "lora"]
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert layer.others == []  # base norms are frozen by peft: nothing else in the layer is NEq's to manage


def test_base_weights_never_change(partial_run):
    trainer, _, before, after = partial_run
    base = [n for n in before if ".lora_" not in n and "modules_to_save" not in n]
    assert len(base) > 20
    for n in base:
        assert torch.equal(before[n], after[n]), n


def test_classifier_in_modules_to_save_keeps_training(partial_run):
    _, fixed, before, after = partial_run
    name = "base_model.model.score.modules_to_save.default.weight"
    assert not torch.equal(before[name], after[name])
    assert all(g[name] is not None for g in fixed.grads)
    original = "base_model.model.score.original_module.weight"
    assert torch.equal(before[original], after[original])


def test_frozen_output_units_freeze_their_lora_b_rows(partial_run):
    _, fixed, before, after = partial_run
    p = "base_model.model.model.layers.0."
    cases = {
        "self_attn.q_proj": (range(0, 2 * HD), range(2 * HD, 4 * HD)),  # query heads 0, 1 | 2, 3
        "self_attn.k_proj": (range(0, HD), range(HD, 2 * HD)),  # K/V head 0 (query heads 0, 1) | K/V head 1
        "self_attn.v_proj": (range(0, HD), range(HD, 2 * HD)),
        "mlp.gate_proj": ([0, 5, 36], [1, 2, 35]),
        "mlp.up_proj": ([0, 5, 36], [1, 2, 35]),
    }
    for path, (frozen, active) in cases.items():
        b = f"{p}{path}.lora_B.default.weight"
        a = f"{p}{path}.lora_A.default.weight"
        frozen, active = list(frozen), list(active)
        assert torch.equal(after[b][frozen], before[b][frozen]), f"frozen rows of {b} moved"
        assert (after[b][active] != before[b][active]).any(dim=1).all(), f"active rows of {b} did not train"
        assert not torch.equal(after[a], before[a]), f"{a} must train while some rows of the module do"
        for g in fixed.grads:
            assert (g[b][frozen] == 0).all() and g[b][active].abs().sum() > 0


def test_frozen_input_units_freeze_their_lora_a_columns(partial_run):
    _, fixed, before, after = partial_run
    p = "base_model.model.model.layers.0."
    cases = {
        "self_attn.o_proj": (range(0, 2 * HD), range(2 * HD, 4 * HD)),
        "mlp.down_proj": ([0, 5, 36], [1, 2, 35]),
    }
    for path, (frozen, active) in cases.items():
        a = f"{p}{path}.lora_A.default.weight"
        b = f"{p}{path}.lora_B.default.weight"
        frozen, active = list(frozen), list(active)
        assert torch.equal(after[a][:, frozen], before[a][:, frozen]), f"frozen columns of {a} moved"
        assert (after[a][:, active] != before[a][:, active]).any(dim=0).all()
        assert not torch.equal(after[b], before[b])
        for g in fixed.grads:
            assert (g[a][:, frozen] == 0).all()


def test_fully_frozen_modules_freeze_whole_adapter_without_gradient(partial_run):
    _, fixed, before, after = partial_run
    layer1 = [n for n in before if ".layers.1." in n and ".lora_" in n]
    assert len(layer1) == 14
    for n in layer1:
        assert torch.equal(before[n], after[n]), n
        assert all(g[n] is None for g in fixed.grads), f"{n} got a gradient"


def test_released_after_training(partial_run):
    trainer, _, _, _ = partial_run
    model = trainer.model
    assert all(p.requires_grad == (".lora_" in n or "modules_to_save" in n) for n, p in model.named_parameters())
    assert not any("_neq_dense_forward" in vars(m) for m in model.modules())


def test_adapter_save_and_load_round_trip(partial_run, tmp_path):
    trainer, _, _, _ = partial_run
    model = trainer.model.eval()
    model.save_pretrained(tmp_path / "adapter")
    batch = pad_collator([{k: v for k, v in r.items() if k != "labels"} for r in token_dataset(8, seed=3)])
    with torch.no_grad():
        expected = model(**batch).logits
    loaded = PeftModel.from_pretrained(tiny_classifier("llama"), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    fresh = tiny_classifier("llama").eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**batch).logits, expected)


def test_huge_eps_freezes_every_adapter_and_backward_stops(tmp_path):
    class AtFreeze(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 8:  # the check that freezes everything
                self.params = snapshot(model)

    trainer = neq_lora_trainer(
        tmp_path,
        paper_rule(
            eps=1.0,
            check_every=4,
            holdout_size=16,
        ),
        peft_config=lora_config(),
        max_steps=14,
    )
    at = AtFreeze()
    trainer.add_callback(at)
    trainer.train()
    checks = {h["step"]: h for h in trainer.neq_callback.tracker.history}
    assert checks[4]["frozen_fraction"] == 0.0 and checks[8]["frozen_fraction"] == 1.0
    assert checks[8]["backward_stops_at_layer"] == 2
    assert checks[8]["trainable_parameters"] == 2 * 32  # the classifier only
    after = snapshot(trainer.model)
    for n in after:
        if ".lora_" in n or "original_module" in n or "modules_to_save" not in n:
            assert torch.equal(at.params[n], after[n]), n
    score = "base_model.model.score.modules_to_save.default.weight"
    assert not torch.equal(at.params[score], after[score])


def test_eps_zero_trains_every_adapter(tmp_path):
    trainer = neq_lora_trainer(tmp_path, peft_config=lora_config(), max_steps=8)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert all(h["frozen_fraction"] == 0.0 for h in trainer.neq_callback.tracker.history)
    for n in before:
        if ".lora_" in n:
            assert not torch.equal(before[n], after[n]), n


def test_user_made_peft_model_with_plain_trainer_and_callback(tmp_path):
    """A PeftModel built by the user, a plain Trainer and the callback: BERT with LoRA on query/value only."""
    model = get_peft_model(tiny_classifier("bert"), lora_config(["query", "value"]))
    train, held = split_holdout(token_dataset(96), 16)
    trainer = Trainer(
        model=model, args=training_args(tmp_path / "out", max_steps=6), train_dataset=train, data_collator=pad_collator
    )
    neq = NEqTrainerCallback(
        paper_rule(eps=0.0, check_every=3),
        neq_dataset=held,
    )
    trainer.add_callback(neq)
    fixed = FixedMasks(neq, {(0, "heads"): unit_mask(4, [2]), (1, "heads"): unit_mask(4, range(4))})
    trainer.add_callback(fixed)
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    names = [b.name for b in neq.unit_map.layers[0].bindings]
    assert names == [f"base_model.model.bert.encoder.layer.0.attention.self.{m}.lora" for m in ("query", "value")]
    p0 = "base_model.model.bert.encoder.layer.0.attention.self."
    p1 = "base_model.model.bert.encoder.layer.1.attention.self."
    for m in ("query", "value"):
        b0 = after[f"{p0}{m}.lora_B.default.weight"]
        assert torch.equal(b0[2 * HD : 3 * HD], before[f"{p0}{m}.lora_B.default.weight"][2 * HD : 3 * HD])
        assert not torch.equal(b0[: 2 * HD], before[f"{p0}{m}.lora_B.default.weight"][: 2 * HD])
        for part in ("lora_A", "lora_B"):
            n = f"{p1}{m}.{part}.default.weight"
            assert torch.equal(after[n], before[n]) and all(g[n] is None for g in fixed.grads)
    for n in before:
        if ".lora_" not in n and "modules_to_save" not in n:
            assert torch.equal(before[n], after[n]), n
    assert not torch.equal(
        before["base_model.model.classifier.modules_to_save.default.weight"],
        after["base_model.model.classifier.modules_to_save.default.weight"],
    )


def test_gpt2_fused_qkv_lora_rows(tmp_path):
    """GPT-2's fused ``c_attn`` (a Conv1D) under LoRA: ``lora_B`` rows are laid out ``[Q | K | V]``."""
    config = lora_config(["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    trainer = neq_lora_trainer(tmp_path, model=tiny_classifier("gpt2"), peft_config=config, max_steps=4)
    trainer.add_callback(FixedMasks(trainer.neq_callback, {(0, "heads"): unit_mask(4, [1])}))
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    b = "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"
    frozen = [off + r for off in (0, 32, 64) for r in range(HD, 2 * HD)]
    active = [r for r in range(96) if r not in frozen]
    assert torch.equal(after[b][frozen], before[b][frozen])
    assert (after[b][active] != before[b][active]).any(dim=1).all()
    a = "base_model.model.transformer.h.0.attn.c_proj.lora_A.default.weight"  # o projection: input columns
    assert torch.equal(after[a][:, HD : 2 * HD], before[a][:, HD : 2 * HD])
    assert not torch.equal(after[a][:, :HD], before[a][:, :HD])


def test_dora_magnitude_freezes_with_its_module(tmp_path):
    """DoRA's magnitude vector has one entry per output feature: it freezes with its module (here: every head of
    layer 0 frozen, its neurons still training)."""
    trainer = neq_lora_trainer(tmp_path, peft_config=lora_config(use_dora=True), max_steps=4)
    fixed = FixedMasks(trainer.neq_callback, {(0, "heads"): unit_mask(4, range(4))})
    trainer.add_callback(fixed)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    magnitudes = [n for n in before if "lora_magnitude_vector" in n and ".layers.0." in n]
    assert len(magnitudes) == 7
    for n in magnitudes:
        frozen = ".self_attn." in n
        assert torch.equal(before[n], after[n]) == frozen, n
        assert all((g[n] is None) == frozen for g in fixed.grads), n


def test_backward_stops_above_a_frozen_bottom_layer_with_gradient_checkpointing(tmp_path):
    """peft + gradient checkpointing turns on ``enable_input_require_grads()``, which would otherwise drive backward
    through every frozen layer down to the embeddings."""
    trainer = neq_lora_trainer(tmp_path, peft_config=lora_config(), max_steps=4, gradient_checkpointing=True)
    masks = {
        (0, "heads"): unit_mask(4, range(4)),
        (0, "neurons"): unit_mask(37, range(37)),
        (1, "heads"): unit_mask(4, [0, 1]),
    }
    fixed = FixedMasks(trainer.neq_callback, masks)
    trainer.add_callback(fixed)
    backward_calls = []
    layer0 = trainer.model.base_model.model.model.layers[0]
    layer0.mlp.down_proj.base_layer.register_full_backward_hook(lambda *_: backward_calls.append(1))
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert backward_calls == []
    for n in before:
        if ".layers.0." in n:
            assert torch.equal(before[n], after[n]) and all(g[n] is None for g in fixed.grads), n
    q1 = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"
    assert torch.equal(after[q1][: 2 * HD], before[q1][: 2 * HD])
    assert (after[q1][2 * HD :] != before[q1][2 * HD :]).any(dim=1).all()
