"""Which parameters belong to which attention head and MLP neuron.

A head ``h`` is observed at the input of the attention output projection, viewed as ``(batch, tokens, heads,
head_dim)``; a neuron ``j`` at the input of the MLP down projection (``act(gate) * up`` for gated MLPs). Following
the pruning view (as transformers' old ``prune_heads``), every weight of a transformer layer belongs to a unit:

- head ``h``: rows ``[h*d, (h+1)*d)`` of Q, K, V (weights and biases) and the same *columns* of the output
  projection; with grouped-query attention a K/V head is shared by ``heads / kv_heads`` query heads and is frozen
  only when all of them are;
- neuron ``j``: row ``j`` of the up (and gate) projection with its bias, and column ``j`` of the down projection.

What is left in a layer (layer norms, the output and down projection biases) freezes when every unit of the layer is
frozen. Modules are found from a table keyed by ``model_type`` (:data:`ARCHITECTURES`), extendable with
:func:`register_architecture`, with a fallback on common module names for architectures not in the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

# Prefixes that wrappers add to module names: peft, torch.compile, FSDP1, activation checkpointing, DDP.
_WRAPPER_TOKENS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where heads and neurons live, as module paths relative to a transformer layer.

    Give either ``q``, ``k`` and ``v`` or a fused ``qkv`` (GPT-2's ``c_attn``, laid out ``[Q | K | V]``).
    ``layers`` is the path of the ``nn.ModuleList`` of layers, matched as a suffix so any wrapper prefix works.
    ``up`` (and ``gate``) map the hidden size to the MLP width, ``down`` maps it back; ``o`` is the attention output
    projection, whose input is the heads' outputs side by side.

    ``num_heads``, ``num_kv_heads`` and ``head_dim`` give the attention layout for models without a transformers
    config (a plain ``nn.Module``); when left out they are read from ``model.config`` (``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``), ``num_kv_heads`` defaults to ``num_heads`` and ``head_dim`` to the
    attention width over ``num_heads``.
    """

    layers: str
    o: str
    up: str
    down: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None
    gate: Optional[str] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None

    def __post_init__(self):
        if (self.qkv is None) == (self.q is None or self.k is None or self.v is None):
            raise ValueError("ArchitectureSpec needs either all of q, k, v or a fused qkv, not both.")
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ArchitectureSpec.{name}={value!r} is invalid: expected None or an integer >= 1.")
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ArchitectureSpec.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (each K/V "
                "head is shared by the same number of query heads)."
            )


_BERT = ArchitectureSpec(
    layers="encoder.layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
)
_LLAMA = ArchitectureSpec(
    layers="layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": ArchitectureSpec(
        layers="transformer.layer",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        up="ffn.lin1",
        down="ffn.lin2",
    ),
    "gpt2": ArchitectureSpec(layers="h", qkv="attn.c_attn", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
}


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Teach NEq where the heads and neurons of ``model_type`` live.

    ``model_type`` is the ``config.model_type`` of a transformers model, or the class name of a model without a
    config (``type(model).__name__``); give such a model's head count in the spec (``num_heads=...``). The spec is
    checked against the model's modules when NEq maps its units.
    """
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"register_architecture needs an ArchitectureSpec, got {type(spec).__name__}.")
    ARCHITECTURES[model_type] = spec


class UnsupportedModelError(ValueError):
    pass


@dataclass
class Binding:
    """One weight whose rows (``axis="out"``) or columns (``axis="in"``) belong to units.

    ``feature_units[f]`` lists the units sharing feature ``f`` (several for a grouped K/V head): the feature is
    frozen only when all of them are. ``companions`` are parameters of the same module that have no per-unit axis
    (a LoRA ``lora_A`` behind a per-row ``lora_B``): they freeze when every feature of the binding is frozen.
    """

    name: str
    module: nn.Module
    axis: str
    kind: str
    feature_units: torch.Tensor
    with_bias: bool
    companions: list[nn.Parameter] = field(default_factory=list)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.module.bias if self.with_bias else None

    @property
    def transposed(self) -> bool:
        # transformers' Conv1D stores its weight as (in, out).
        return type(self.module).__name__ == "Conv1D"

    def weight_dim(self) -> int:
        """Dimension of ``weight`` that indexes this binding's features."""
        out_dim = 1 if self.transposed else 0
        return out_dim if self.axis == "out" else 1 - out_dim

    def feature_active(self, unit_active: torch.Tensor) -> torch.Tensor:
        return unit_active[self.feature_units.to(unit_active.device)].any(dim=-1)


@dataclass
class LayerUnits:
    """The units of one transformer layer and the parameters they own."""

    index: int
    name: str
    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_neurons: int
    head_observer: nn.Module
    neuron_observer: nn.Module
    bindings: list[Binding]
    others: list[nn.Parameter]

    def num_units(self, kind: str) -> int:
        return self.num_heads if kind == "heads" else self.num_neurons


@dataclass
class UnitMap:
    model_type: str
    layers: list[LayerUnits]
    layer_list: nn.ModuleList

    def summary(self) -> dict:
        first = self.layers[0]
        return {
            "model_type": self.model_type,
            "layers": len(self.layers),
            "heads_per_layer": first.num_heads,
            "kv_heads_per_layer": first.num_kv_heads,
            "head_dim": first.head_dim,
            "neurons_per_layer": first.num_neurons,
        }


def strip_wrappers(name: str) -> str:
    """Module name without wrapper prefixes (peft, FSDP, checkpointing, torch.compile, DDP)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def _unwrap(module: nn.Module) -> nn.Module:
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "_checkpoint_wrapped_module", None)
        if inner is None:
            return module
        module = inner


def _base_layer(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_layer", None)
    return _unwrap(get_base() if callable(get_base) else module)


def _lora_pairs(module: nn.Module) -> list[tuple[nn.Module, nn.Module, list[nn.Parameter]]]:
    """(lora_A, lora_B, other parameters of the adapter such as DoRA's magnitude) of each active adapter of a peft
    LoRA layer; empty for anything else."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return []
    active = getattr(module, "active_adapters", None) or list(lora_a.keys())
    if isinstance(active, str):
        active = [active]
    magnitude = getattr(module, "lora_magnitude_vector", None)
    magnitude = magnitude if isinstance(magnitude, nn.ModuleDict) else {}
    return [
        (lora_a[n], lora_b[n], list(magnitude[n].parameters()) if n in magnitude else [])
        for n in active
        if n in lora_a and n in lora_b
    ]


def _features(module: nn.Module, axis: str) -> int:
    if type(module).__name__ == "Conv1D":
        return module.nf if axis == "out" else module.weight.shape[0]
    return module.out_features if axis == "out" else module.in_features


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _find_spec(model: nn.Module, model_type: str) -> ArchitectureSpec:
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    spec = _guess_spec(model)
    if spec is None:
        raise UnsupportedModelError(
            f"NEq cannot find the attention heads and MLP neurons of model_type={model_type!r}. Supported: "
            f"{sorted(ARCHITECTURES)}. Describe a custom architecture with "
            "`neq_hf.register_architecture(model_type, neq_hf.ArchitectureSpec(layers=..., q=..., k=..., v=..., "
            "o=..., up=..., down=..., gate=None))`, giving module paths relative to one transformer layer."
        )
    return spec


_GUESS = {
    "q": ("q_proj", "query", "q_lin", "wq", "q"),
    "k": ("k_proj", "key", "k_lin", "wk", "k"),
    "v": ("v_proj", "value", "v_lin", "wv", "v"),
    "o": ("o_proj", "out_proj", "out_lin", "attention.output.dense", "wo", "dense"),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "fc1", "lin1", "intermediate.dense", "fc_in", "w3"),
    "down": ("down_proj", "fc2", "lin2", "output.dense", "fc_out", "w2"),
}


def _guess_spec(model: nn.Module) -> Optional[ArchitectureSpec]:
    """Fallback: the longest ModuleList of identical blocks, with q/k/v/o/up/down found by common names."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        return None
    layers_name, layers = best
    linear_names = [n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)]
    found = {}
    for role, candidates in _GUESS.items():
        for cand in candidates:
            hits = [n for n in linear_names if n == cand or n.endswith("." + cand)]
            if role in ("o", "down") and cand == "dense":
                hits = [n for n in hits if "attn" in n or "attention" in n]
            if len(hits) == 1 and hits[0] not in found.values():
                found[role] = hits[0]
                break
    if not all(r in found for r in ("q", "k", "v", "o", "up", "down")):
        return None
    return ArchitectureSpec(layers=strip_wrappers(layers_name), **found)


def _get(layer: nn.Module, path: str, layer_name: str) -> nn.Module:
    module = layer
    for part in path.split("."):
        module = _unwrap(module)
        if not hasattr(module, part):
            raise UnsupportedModelError(
                f"NEq expected a module `{path}` in layer `{layer_name}` but found none; the model does not match "
                "its registered ArchitectureSpec. Register a matching one with `neq_hf.register_architecture`."
            )
        module = getattr(module, part)
    return module


def _shape(module: nn.Module) -> str:
    base = _base_layer(module)
    return f"{_features(base, 'in')} -> {_features(base, 'out')} features"


def _check_shapes(layer_name: str, spec: ArchitectureSpec, roles: list, o_mod: nn.Module, down_mod: nn.Module):
    """The spec's modules must chain as a transformer layer does: Q/K/V and up/gate read the hidden size that the
    attention output and down projections write, and down reads what up writes. Catches swapped or misnamed
    modules, which would otherwise map the wrong rows to units."""
    hidden = _features(_base_layer(o_mod), "out")
    wrong = []
    if _features(_base_layer(down_mod), "out") != hidden:
        wrong.append(f"`{spec.down}` (down, {_shape(down_mod)}) must write the hidden size {hidden}")
    for path, module, axis, *_ in roles:
        if axis == "out" and _features(_base_layer(module), "in") != hidden:
            role = "up" if path == spec.up else ("gate" if path == spec.gate else "q/k/v")
            wrong.append(f"`{path}` ({role}, {_shape(module)}) must read the hidden size {hidden}")
    if wrong:
        up_mod = next(m for p, m, *_ in roles if p == spec.up)
        swapped = _features(_base_layer(up_mod), "in") == _features(_base_layer(down_mod), "out") != hidden
        hint = " Are `up` and `down` swapped?" if swapped else ""
        raise UnsupportedModelError(
            f"{layer_name}: the ArchitectureSpec does not match the modules (hidden size {hidden}, the output of "
            f"`{spec.o}` (o, {_shape(o_mod)})): " + "; ".join(wrong) + f".{hint} Fix the module paths given to "
            "`neq_hf.register_architecture`."
        )


def discover_units(model: nn.Module) -> UnitMap:
    """Map every attention head and MLP neuron of ``model`` (a transformers model, possibly peft-wrapped)."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    spec = _find_spec(model, model_type)

    layer_list, layers_name = None, None
    for name, module in model.named_modules():
        clean = strip_wrappers(name)
        if isinstance(module, nn.ModuleList) and (clean == spec.layers or clean.endswith("." + spec.layers)):
            if layer_list is None or len(module) > len(layer_list):
                layer_list, layers_name = module, name
    if layer_list is None:
        raise UnsupportedModelError(
            f"NEq found no layer list `{spec.layers}` in this {model_type!r} model. If the architecture differs "
            "from the registered one, register it with `neq_hf.register_architecture`."
        )

    num_heads = spec.num_heads or getattr(config, "num_attention_heads", None)
    if not num_heads:
        where = "Its config has" if config is not None else "It has no transformers config, and so"
        raise UnsupportedModelError(
            f"NEq needs the number of attention heads of this {model_type!r} model. {where} no "
            "`num_attention_heads`: give it in the architecture spec, e.g. `neq_hf.register_architecture("
            f"{model_type!r}, ArchitectureSpec(..., num_heads=8, num_kv_heads=None, head_dim=None))`."
        )
    num_kv_heads = spec.num_kv_heads or getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = spec.head_dim or getattr(config, "head_dim", None)

    layers = []
    for index, layer in enumerate(layer_list):
        layer_name = f"{layers_name}.{index}"
        o_mod = _get(layer, spec.o, layer_name)
        down_mod = _get(layer, spec.down, layer_name)
        attn_width = _features(_base_layer(o_mod), "in")
        hd = head_dim or attn_width // num_heads
        if hd * num_heads != attn_width or num_heads % num_kv_heads:
            raise UnsupportedModelError(
                f"{layer_name}: {num_heads} heads (and {num_kv_heads} K/V heads) of dimension {hd} do not match "
                f"the {attn_width} input features of the attention output projection `{spec.o}`."
            )
        n_neurons = _features(_base_layer(down_mod), "in")
        head_ids = torch.arange(num_heads)
        rep = num_heads // num_kv_heads
        per_q = head_ids.repeat_interleave(hd)[:, None]  # (H*hd, 1)
        per_kv = (torch.arange(num_kv_heads)[:, None] * rep + torch.arange(rep)[None, :]).repeat_interleave(hd, 0)
        per_neuron = torch.arange(n_neurons)[:, None]

        roles: list[tuple[str, nn.Module, str, str, torch.Tensor]] = []
        if spec.qkv is not None:
            # Fused [Q | K | V] (no GQA in such models): feature f belongs to head (f % width) // hd.
            qkv_units = torch.cat([per_q, per_q, per_q], 0)
            roles.append((spec.qkv, _get(layer, spec.qkv, layer_name), "out", "heads", qkv_units))
        else:
            roles.append((spec.q, _get(layer, spec.q, layer_name), "out", "heads", per_q))
            roles.append((spec.k, _get(layer, spec.k, layer_name), "out", "heads", per_kv))
            roles.append((spec.v, _get(layer, spec.v, layer_name), "out", "heads", per_kv))
        roles.append((spec.o, o_mod, "in", "heads", per_q))
        if spec.gate is not None:
            roles.append((spec.gate, _get(layer, spec.gate, layer_name), "out", "neurons", per_neuron))
        roles.append((spec.up, _get(layer, spec.up, layer_name), "out", "neurons", per_neuron))
        roles.append((spec.down, down_mod, "in", "neurons", per_neuron))

        _check_shapes(layer_name, spec, roles, o_mod, down_mod)
        bindings: list[Binding] = []
        for path, module, axis, kind, units in roles:
            base = _base_layer(module)
            if _features(base, axis) != units.shape[0]:
                raise UnsupportedModelError(
                    f"{layer_name}.{path}: expected {units.shape[0]} {axis}put features for {kind}, found "
                    f"{_features(base, axis)}."
                )
            if base.weight.requires_grad:
                bindings.append(Binding(f"{layer_name}.{path}", base, axis, kind, units, with_bias=axis == "out"))
            for lora_a, lora_b, extra in _lora_pairs(module):
                # A LoRA update B @ A: output features are rows of B, input features columns of A. DoRA's magnitude
                # (one entry per output feature) freezes with the whole module, not per unit.
                per_unit, whole = (lora_b, lora_a) if axis == "out" else (lora_a, lora_b)
                bindings.append(
                    Binding(
                        f"{layer_name}.{path}.lora",
                        per_unit,
                        axis,
                        kind,
                        units,
                        with_bias=axis == "out" and getattr(per_unit, "bias", None) is not None,
                        companions=[p for p in [*whole.parameters(), *extra] if p.requires_grad],
                    )
                )
        owned = set()
        for b in bindings:
            owned.add(id(b.weight))
            if b.bias is not None:
                owned.add(id(b.bias))
            owned.update(id(p) for p in b.companions)
        others = [p for p in layer.parameters() if p.requires_grad and id(p) not in owned]
        head_obs = _base_layer(o_mod)
        neuron_obs = _base_layer(down_mod)
        layers.append(
            LayerUnits(
                index,
                layer_name,
                layer,
                num_heads,
                num_kv_heads,
                hd,
                n_neurons,
                head_obs,
                neuron_obs,
                bindings,
                others,
            )
        )
    return UnitMap(model_type=model_type, layers=layers, layer_list=layer_list)


def lora_in_model(model: nn.Module) -> bool:
    return any(_lora_pairs(m) for m in model.modules())


def parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): re.sub(r"\.base_layer\b", "", strip_wrappers(n)) for n, p in model.named_parameters()}
