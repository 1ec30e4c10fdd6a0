"""Which rows belong to which unit, for every supported architecture."""

import pytest
import torch
from conftest import snapshot, tiny_classifier, unit_mask
from torch import nn

from neq_hf import ArchitectureSpec, Freezer, UnsupportedModelError, discover_units, register_architecture
from neq_hf.units import ARCHITECTURES

ARCHS = ["bert", "roberta", "electra", "distilbert", "gpt2", "llama", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_discovery_counts(arch):
    units = discover_units(tiny_classifier(arch))
    assert len(units.layers) == 2
    layer = units.layers[0]
    assert (layer.num_heads, layer.head_dim, layer.num_neurons) == (4, 8, 37)
    assert layer.num_kv_heads == (2 if arch in ("llama", "mistral", "qwen2") else 4)
    # every trainable weight of a layer is owned by a unit or by the layer's leftovers
    owned = {id(b.weight) for b in layer.bindings} | {id(b.bias) for b in layer.bindings if b.bias is not None}
    owned |= {id(p) for p in layer.others}
    assert all(id(p) in owned for p in layer.module.parameters())


def _grads_with(model, unit_active):
    freezer = Freezer(model, discover_units(model))
    freezer.apply(unit_active)
    model.zero_grad(set_to_none=True)
    ids = torch.randint(1, 90, (3, 7))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.backward()
    return freezer


@pytest.mark.parametrize("arch", ["bert", "distilbert", "llama", "qwen2"])
def test_frozen_rows_get_zero_grad_split_qkv(arch):
    model = tiny_classifier(arch)
    _grads_with(model, {(0, "heads"): unit_mask(4, [1]), (0, "neurons"): unit_mask(37, [3, 30])})
    layer = discover_units(model).layers[0]
    by_path = {b.name[len(layer.name) + 1 :]: b for b in layer.bindings}
    spec = ARCHITECTURES[arch]
    q, k, o, up, down = (by_path[path] for path in (spec.q, spec.k, spec.o, spec.up, spec.down))
    rows = slice(8, 16)
    assert (q.weight.grad[rows] == 0).all() and (q.weight.grad[:8].abs().sum() > 0)
    assert (o.weight.grad[:, rows] == 0).all() and o.weight.grad[:, :8].abs().sum() > 0
    if q.bias is not None:
        assert (q.bias.grad[rows] == 0).all()
    if layer.num_kv_heads < layer.num_heads:
        # head 1 shares its K/V head with head 0, which is active: K/V rows keep training
        assert k.weight.grad[0:8].abs().sum() > 0
    else:
        assert (k.weight.grad[rows] == 0).all()
    assert (up.weight.grad[[3, 30]] == 0).all() and up.weight.grad[[0, 4]].abs().sum() > 0
    assert (down.weight.grad[:, [3, 30]] == 0).all()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_grouped_kv_head_frozen_only_with_all_its_query_heads(arch):
    model = tiny_classifier(arch)
    _grads_with(model, {(0, "heads"): unit_mask(4, [2, 3])})  # both query heads of K/V group 1
    attn = model.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj):
        assert (proj.weight.grad[8:16] == 0).all()
        assert proj.weight.grad[0:8].abs().sum() > 0
    assert (attn.q_proj.weight.grad[16:32] == 0).all()
    gate = model.model.layers[0].mlp.gate_proj
    assert gate.weight.grad.abs().sum() > 0


def test_gpt2_fused_qkv_columns():
    model = tiny_classifier("gpt2")
    _grads_with(model, {(1, "heads"): unit_mask(4, [0]), (1, "neurons"): unit_mask(37, [5])})
    block = model.transformer.h[1]
    g = block.attn.c_attn.weight.grad  # Conv1D: (in, 3E)
    for offset in (0, 32, 64):
        assert (g[:, offset : offset + 8] == 0).all()
        assert g[:, offset + 8 : offset + 16].abs().sum() > 0
    assert (block.attn.c_attn.bias.grad[[0, 32, 64]] == 0).all()
    assert (block.attn.c_proj.weight.grad[0:8] == 0).all()  # Conv1D rows = input features
    assert (block.mlp.c_fc.weight.grad[:, 5] == 0).all()
    assert (block.mlp.c_proj.weight.grad[5] == 0).all()


def test_fully_frozen_layer_gets_no_grad_and_backward_stops():
    model = tiny_classifier("bert")
    freezer = _grads_with(model, {(0, "heads"): unit_mask(4, range(4)), (0, "neurons"): unit_mask(37, range(37))})
    layer0 = model.bert.encoder.layer[0]
    assert all(p.grad is None and not p.requires_grad for p in layer0.parameters())
    assert all(p.grad is None for p in model.bert.embeddings.parameters())
    assert freezer.stop_layer == 1
    assert all(p.grad is not None for p in model.bert.encoder.layer[1].parameters())
    assert model.classifier.weight.grad is not None


def test_release_restores_everything():
    model = tiny_classifier("bert")
    freezer = _grads_with(model, {(0, "heads"): unit_mask(4, range(4)), (0, "neurons"): unit_mask(37, range(37))})
    freezer.release()
    assert all(p.requires_grad for p in model.parameters())
    assert freezer.stop_layer == 0


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])


def test_unsupported_model_error_says_how_to_register():
    with pytest.raises(UnsupportedModelError, match="register_architecture"):
        discover_units(Custom())


def test_register_custom_architecture():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    model.config.model_type = "my-bert"
    try:
        register_architecture("my-bert", ARCHITECTURES["bert"])
        assert discover_units(model).layers[0].num_heads == 2
    finally:
        ARCHITECTURES.pop("my-bert")


def test_spec_requires_q_k_v_or_fused():
    with pytest.raises(ValueError, match="qkv"):
        ArchitectureSpec(layers="h", o="o", up="u", down="d", q="q")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_input_require_grads_does_not_force_backward_through_frozen_layers(checkpointing):
    model = tiny_classifier("bert")
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.enable_input_require_grads()
    reached = []

    def watch(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda g: reached.append(True))

    model.bert.encoder.layer[0].register_forward_hook(watch)
    freezer = Freezer(model, discover_units(model))
    freezer.locate_embeddings(model, lambda: model(input_ids=torch.randint(1, 90, (2, 5))))
    model.train()
    model(input_ids=torch.randint(1, 90, (3, 7)), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert reached, "without NEq, backward reaches layer 0"
    reached.clear()
    model.zero_grad(set_to_none=True)
    freezer.apply({(0, "heads"): unit_mask(4, range(4)), (0, "neurons"): unit_mask(37, range(37))})
    model(input_ids=torch.randint(1, 90, (3, 7)), labels=torch.tensor([0, 1, 0])).loss.backward()
    assert not reached, "backward went through the frozen first layer"
    layer1 = model.bert.encoder.layer[1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer1.parameters())
    assert all(p.grad is None for p in model.bert.embeddings.parameters())


def test_tied_embeddings_keep_training_through_the_head():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    freezer = Freezer(model, discover_units(model))
    freezer.locate_embeddings(model, lambda: model(input_ids=torch.randint(1, 90, (2, 5))))
    assert all(p is not model.lm_head.weight for p in freezer.below)
    freezer.apply(
        {
            (i, k): torch.zeros(4 if k == "heads" else 37, dtype=torch.bool)
            for i in range(2)
            for k in ("heads", "neurons")
        }
    )
    ids = torch.randint(1, 90, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None
    assert all(p.grad is None for p in model.model.layers.parameters())


class _Attn(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, hidden=16, width=24):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, width), nn.Linear(width, hidden)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = _Attn(), _MLP()


class PlainModel(nn.Module):
    """No transformers config: NEq looks it up by class name."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])


_PLAIN = dict(layers="blocks", q="attn.q", k="attn.k", v="attn.v", o="attn.out")


@pytest.fixture
def registered():
    added = []

    def register(name, spec):
        register_architecture(name, spec)
        added.append(name)

    yield register
    for name in added:
        ARCHITECTURES.pop(name, None)


def test_plain_module_without_config_needs_and_takes_explicit_head_counts(registered):
    registered("PlainModel", ArchitectureSpec(**_PLAIN, up="mlp.fc1", down="mlp.fc2"))
    with pytest.raises(UnsupportedModelError, match=r"no transformers config.*num_heads="):
        discover_units(PlainModel())
    registered("PlainModel", ArchitectureSpec(**_PLAIN, up="mlp.fc1", down="mlp.fc2", num_heads=4))
    units = discover_units(PlainModel())
    layer = units.layers[1]
    assert units.model_type == "PlainModel" and len(units.layers) == 2
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.num_neurons) == (4, 4, 4, 24)


def test_explicit_head_dim_must_tile_the_attention_width(registered):
    registered("PlainModel", ArchitectureSpec(**_PLAIN, up="mlp.fc1", down="mlp.fc2", num_heads=4, head_dim=3))
    with pytest.raises(UnsupportedModelError, match="4 heads .* of dimension 3 do not match the 16 input features"):
        discover_units(PlainModel())


def test_swapped_up_and_down_are_refused_with_modules_and_shapes(registered):
    registered("PlainModel", ArchitectureSpec(**_PLAIN, up="mlp.fc2", down="mlp.fc1", num_heads=4))
    with pytest.raises(UnsupportedModelError) as err:
        discover_units(PlainModel())
    message = str(err.value)
    assert "blocks.0" in message and "`mlp.fc2` (up, 24 -> 16 features) must read the hidden size 16" in message
    assert "`mlp.fc1` (down, 16 -> 24 features) must write the hidden size 16" in message
    assert "Are `up` and `down` swapped?" in message


def test_spec_with_a_module_of_the_wrong_width_is_refused(registered):
    model = PlainModel()
    for block in model.blocks:
        block.attn.k = nn.Linear(8, 16)  # reads 8 features, not the hidden size
    registered("PlainModel", ArchitectureSpec(**_PLAIN, up="mlp.fc1", down="mlp.fc2", num_heads=4))
    with pytest.raises(UnsupportedModelError, match=r"`attn.k` \(q/k/v, 8 -> 16 features\) must read the hidden"):
        discover_units(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=0), "num_heads=0"),
        (dict(num_heads=4, num_kv_heads=3), "must divide num_heads=4"),
        (dict(head_dim=True), "head_dim=True"),
    ],
)
def test_spec_head_counts_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArchitectureSpec(**_PLAIN, up="mlp.fc1", down="mlp.fc2", **kwargs)


def test_custom_model_example_trains_and_freezes(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import custom_model

    try:
        torch.manual_seed(0)
        before = snapshot(custom_model.TinyClassifier())
        trainer = custom_model.main(str(tmp_path), max_steps=20)
    finally:
        ARCHITECTURES.pop("TinyClassifier", None)
    summary = trainer.neq_summary()
    assert summary["units"]["layers"] == 2 and summary["units"]["heads_per_layer"] == custom_model.HEADS
    assert summary["units"]["neurons_per_layer"] == custom_model.MLP_WIDTH
    assert summary["checks"] >= 2
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    after = snapshot(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("blocks."))
