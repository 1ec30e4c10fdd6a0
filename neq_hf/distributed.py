"""NEq under several processes: which engine runs the model, whether NEq can freeze exactly there, and checks that
every process takes the same decisions.

NEq's own multi-process logic is a single ``all_reduce`` of the three cosine sums per unit (see
:mod:`neq_hf.tracker`); everything else is left to Accelerate and ``torch.distributed``. What each engine allows:

- **DDP** (``accelerate launch`` multi-GPU/multi-CPU, ``torchrun``): supported exactly. Every process holds the full
  parameters and applies the same masks, so ``requires_grad`` toggling, row-sparse gradients and the restore of
  frozen rows around the optimizer step work as in one process. A tensor switched to ``requires_grad=False`` after
  wrapping is an unused parameter for DDP: ``find_unused_parameters=True`` is required, and ``static_graph`` is not
  allowed (the set of trained tensors changes at each check).
- **FSDP1** (``FullyShardedDataParallel``): refused. Parameters are flattened into ``FlatParameter`` shards: the
  rows of one weight are not addressable, and ``requires_grad`` of an original parameter does not reach the
  ``FlatParameter`` that is actually trained (with ``use_orig_params=True`` it must stay uniform per flat parameter).
- **FSDP2** (``fully_shard``, Accelerate's FSDP2 plugin or a custom loop): supported exactly. Parameters are
  ``DTensor`` shards by rows (``Shard(0)``). Whole-tensor freezing (``requires_grad``, synced by FSDP2 to the
  unsharded parameter at each all-gather), the row-sparse backward (it runs on the unsharded weight) and the backward
  stop work as in one process; :class:`ShardedFreezer` writes the frozen rows of partly frozen weights, and of their
  optimizer state, back on each process's local shard, with indices translated to local coordinates. Held-out passes
  are padded so that every process runs as many sharded forwards, and the unsharded parameters FSDP2 keeps after a
  forward without backward are freed after each pass.
- **DeepSpeed ZeRO** (any stage): refused. DeepSpeed owns the optimizer and partitions trainable parameters into
  flat fp32 groups built once at initialization; a parameter without a gradient still gets weight decay and moment
  updates, and rows cannot be restored.
- **nn.DataParallel** (several GPUs in one process) and tensor parallelism: refused (modules are replicated or
  weights sharded behind NEq's back).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .freezing import Freezer, _row_state_keys, _torch_optimizer


class Engine(str, Enum):
    """How the model is run across devices."""

    SINGLE = "single"
    DDP = "ddp"
    FSDP1 = "fsdp1"
    FSDP2 = "fsdp2"
    DEEPSPEED = "deepspeed"
    DATA_PARALLEL = "data_parallel"
    TENSOR_PARALLEL = "tensor_parallel"
    OTHER = "other"  # XLA, Megatron-LM: not inspected, refused


_ALTERNATIVE = (
    "Use DDP instead (`accelerate launch --multi_gpu` or `torchrun`, with "
    "examples/accelerate_configs/multi_gpu.yaml), or, when the model does not fit on one device, FSDP2 "
    "(examples/accelerate_configs/fsdp2.yaml) or NEq with LoRA (`NEqTrainer(..., peft_config=LoraConfig(...))`) under "
    "DDP."
)


def _accelerate_state() -> dict:
    """Accelerate's shared state if an `Accelerator` was created (the Trainer creates one), without creating it."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return {}
    shared = AcceleratorState._shared_state
    return dict(shared) if shared else {}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _fsdp_version_from_args(args: Any) -> Optional[int]:
    if not getattr(args, "fsdp", None):
        return None
    config = getattr(args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 1))) if isinstance(config, dict) else 1


def _world_size(args: Any) -> int:
    size = getattr(args, "world_size", None)
    if isinstance(size, int) and size > 0:
        return size
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def detect_engine(args: Any = None, model: Optional[nn.Module] = None) -> Engine:
    """The engine that runs ``model``, from the module wrappers, Accelerate's state and the `TrainingArguments`.

    ``model`` is the model the Trainer hands to callbacks: the bare model under DDP and DeepSpeed, the wrapped one
    under FSDP.
    """
    modules = list(model.modules()) if model is not None else []
    state = _accelerate_state()
    distributed_type = str(getattr(state.get("distributed_type"), "value", state.get("distributed_type") or ""))

    # DeepSpeed: wrapper, ZeRO-3 partitioned parameters, Accelerate's state, Trainer argument or launcher env.
    if (
        any(type(m).__name__ == "DeepSpeedEngine" for m in modules)
        or (model is not None and any(hasattr(p, "ds_id") for p in model.parameters()))
        or distributed_type == "DEEPSPEED"
        or getattr(args, "deepspeed", None)
        or _env_true("ACCELERATE_USE_DEEPSPEED")
    ):
        return Engine.DEEPSPEED

    # FSDP: wrappers first, then the plugin, the Trainer arguments and the launcher env.
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule, FullyShardedDataParallel = (), ()
    if FullyShardedDataParallel and any(isinstance(m, FullyShardedDataParallel) for m in modules):
        return Engine.FSDP1
    if FSDPModule and any(isinstance(m, FSDPModule) for m in modules):
        return Engine.FSDP2
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in modules):
        return Engine.DDP  # what actually wraps the model, whatever the launcher's FSDP settings say
    plugin = state.get("fsdp_plugin")
    if distributed_type == "FSDP" or plugin is not None:
        return Engine.FSDP2 if getattr(plugin, "fsdp_version", 1) == 2 else Engine.FSDP1
    version = _fsdp_version_from_args(args)
    if version is None and _env_true("ACCELERATE_USE_FSDP"):
        version = int(os.environ.get("FSDP_VERSION", "1"))
    if version is not None:
        return Engine.FSDP2 if version == 2 else Engine.FSDP1

    if distributed_type in ("XLA", "MEGATRON_LM"):
        return Engine.OTHER
    if (getattr(model, "tp_size", None) or 1) > 1:
        return Engine.TENSOR_PARALLEL
    if model is not None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = None
        if DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters()):
            return Engine.TENSOR_PARALLEL
    if any(isinstance(m, nn.DataParallel) for m in modules) or (
        (getattr(args, "n_gpu", 1) or 1) > 1 and _world_size(args) == 1
    ):
        return Engine.DATA_PARALLEL
    return Engine.DDP if _world_size(args) > 1 else Engine.SINGLE


def _ddp_find_unused_parameters(args: Any, model: Optional[nn.Module]) -> bool:
    """The ``find_unused_parameters`` the Trainer gives DDP (see ``Trainer._build_accelerator_args``)."""
    explicit = getattr(args, "ddp_find_unused_parameters", None)
    if explicit is not None:
        return bool(explicit)
    checkpointing = bool(
        getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    )
    if model is not None and hasattr(model, "is_activation_checkpointing"):
        checkpointing = checkpointing or bool(model.is_activation_checkpointing)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return True
    return not checkpointing if isinstance(model, PreTrainedModel) else True


def check_engine(args: Any, model: Optional[nn.Module] = None) -> Engine:
    """Return the engine if NEq can freeze exactly under it; raise a `ValueError` naming what to use instead.

    Called when training begins, before anything is frozen: by [`NEqTrainerCallback`] with the `TrainingArguments`,
    by [`NEq`] with ``args=None`` and the model as the custom loop runs it (a DDP wrapper is inspected directly).
    """
    engine = detect_engine(args, model)
    if engine in (Engine.SINGLE, Engine.FSDP2):
        return engine
    if engine is Engine.DDP and isinstance(model, nn.parallel.DistributedDataParallel):
        # A custom loop hands over the DDP wrapper itself (e.g. from `accelerator.prepare`): read its settings.
        if not model.find_unused_parameters:
            raise ValueError(
                "NEq switches frozen parameters to requires_grad=False during training, which DDP only allows with "
                "find_unused_parameters=True, but this model's DDP wrapper has find_unused_parameters=False. With "
                "Accelerate, create the accelerator with `Accelerator(kwargs_handlers=["
                "DistributedDataParallelKwargs(find_unused_parameters=True)])`."
            )
        if model.static_graph:
            raise ValueError(
                "NEq changes which parameters are trained at every check, but this model's DDP wrapper has "
                "static_graph=True. Wrap it with static_graph=False (the default)."
            )
        return engine
    if engine is Engine.DDP and args is None:
        # A bare model in a custom loop: DDP's settings are not visible here (DDP itself raises at the first step
        # where a frozen parameter gets no gradient if find_unused_parameters=False).
        return engine
    if engine is Engine.DDP:
        if not _ddp_find_unused_parameters(args, model):
            raise ValueError(
                "NEq switches frozen parameters to requires_grad=False during training, which DDP only allows with "
                "find_unused_parameters=True, but this run gives DDP find_unused_parameters=False (set explicitly, "
                "or by the Trainer because activation checkpointing is on). Set "
                "TrainingArguments(ddp_find_unused_parameters=True); with activation checkpointing keep the "
                'non-reentrant variant (activation_checkpointing_kwargs={"use_reentrant": False}, the default).'
            )
        if getattr(args, "ddp_static_graph", None):
            raise ValueError(
                "NEq changes which parameters are trained at every check, but ddp_static_graph=True tells DDP the "
                "set of used parameters never changes. Leave TrainingArguments.ddp_static_graph unset."
            )
        kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
            args, "gradient_checkpointing_kwargs", None
        )
        if (
            isinstance(kwargs, dict)
            and kwargs.get("use_reentrant")
            and getattr(args, "activation_checkpointing", False)
        ):
            raise ValueError(
                "NEq under DDP needs find_unused_parameters=True, which reentrant activation checkpointing does not "
                'support. Use activation_checkpointing_kwargs={"use_reentrant": False} (the transformers default).'
            )
        return engine
    reasons = {
        Engine.FSDP1: (
            "FSDP1 flattens parameters into FlatParameter shards: the rows of a weight that belong to one head or "
            "neuron cannot be frozen, and requires_grad of an original parameter does not reach the FlatParameter "
            "that is trained (with use_orig_params=True it must stay uniform per FlatParameter)."
        ),
        Engine.DEEPSPEED: (
            "DeepSpeed ZeRO owns the optimizer and packs trainable parameters into flat partitions built once at "
            "initialization: parameters NEq freezes later would still receive weight decay and moment updates, and "
            "frozen rows cannot be restored."
        ),
        Engine.DATA_PARALLEL: (
            "torch.nn.DataParallel (several GPUs driven by one process) replicates modules at every forward, "
            "which bypasses NEq's row-sparse backward. Launch one process per GPU instead (`accelerate launch` or "
            "`torchrun`), which the Trainer runs with DDP."
        ),
        Engine.TENSOR_PARALLEL: (
            "tensor parallelism shards the weights of heads and neurons across processes, so NEq cannot address "
            "their rows."
        ),
        Engine.OTHER: "NEq has only been validated with DDP, and this engine (XLA or Megatron-LM) is not inspected.",
    }
    raise ValueError(f"NEq cannot freeze exactly under {engine.value}: {reasons[engine]} {_ALTERNATIVE}")


def reduce_device(model_device: torch.device) -> torch.device:
    """Where a tensor must live for ``all_reduce`` on the default process group.

    A pure gloo group reduces CPU tensors; NCCL (and XCCL, HCCL, or a mixed ``"cpu:gloo,cuda:nccl"`` group, which
    routes each tensor to the backend of its device) takes the model's device.
    """
    backend = str(dist.get_backend()).lower()
    return torch.device("cpu") if backend == "gloo" else model_device


# -- consistency checks (tests and debugging) ------------------------------------------------------------------------
def mask_digest(frozen: dict) -> str:
    """sha256 of the frozen masks ``{(layer, kind): bool tensor}``, in key order, with their keys and shapes."""
    h = hashlib.sha256()
    for key in sorted(frozen):
        mask = frozen[key].detach().to("cpu", torch.bool).contiguous()
        h.update(repr((key, tuple(mask.shape))).encode())
        h.update(mask.numpy().tobytes())
    return h.hexdigest()


def tensor_digest(tensors) -> str:
    """sha256 of the bytes of ``tensors`` (an iterable of tensors or of ``(name, tensor)`` pairs), in order."""
    h = hashlib.sha256()
    for item in tensors:
        name, t = item if isinstance(item, tuple) else ("", item)
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        # a copy: numpy must not share the storage of a parameter (FSDP2 frees unsharded storage by resizing it)
        t = t.to("cpu", copy=True).contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gather_strings(value: str) -> list[str]:
    """``value`` from every process (rank order), through ``all_gather_object``; ``[value]`` in one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [str(v) for v in out]


def assert_same_masks(frozen: dict) -> str:
    """Check that every process holds the same frozen masks; returns their digest. Collective: call on all ranks."""
    digests = gather_strings(mask_digest(frozen))
    if len(set(digests)) != 1:
        raise RuntimeError(f"NEq masks differ across processes: {digests}")
    return digests[0]


# -- FSDP2: freezing rows on local shards ----------------------------------------------------------------------------
def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward without backward (the root module keeps them until
    the next backward), so that the next forward gathers them again with their current ``requires_grad``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place writes reach the DTensor), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _shard_range(p: torch.Tensor, dim: int) -> Optional[tuple[int, int]]:
    """``(start, stop)`` of the global indices along ``dim`` held by this process's shard of ``p``; ``None`` when
    ``p`` is not sharded along ``dim`` (every index is local)."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = [pl.dim for pl in p.placements if isinstance(pl, Shard)]
    if not sharded:
        return None
    if len(sharded) > 1 or p.device_mesh.ndim != 1:
        raise ValueError(
            "NEq supports FSDP2 parameters sharded along one dimension of a 1-D device mesh (fully_shard's default "
            f"Shard(0)), got placements {p.placements} on a {p.device_mesh.ndim}-D mesh. Use fully_shard without "
            "shard_placement_fn and without HSDP."
        )
    if sharded[0] != dim:
        return None
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[dim], offset[dim] + shape[dim]


@dataclass
class _LocalPart:
    """The frozen rows of a partly frozen tensor that this process holds: local indices along ``dim`` of the local
    shard, their values when they froze, and (after the first optimizer step) those of its optimizer state."""

    param: nn.Parameter
    dim: int
    frozen: torch.Tensor
    rows: torch.Tensor
    states: Optional[dict[str, torch.Tensor]] = None
    known: set = field(default_factory=set)


class ShardedFreezer(Freezer):
    """[`Freezer`] for FSDP2 (``fully_shard``), whose parameters are DTensors sharded by rows across processes.

    Whole-tensor freezing, the row-sparse backward (it runs on the unsharded weight during forward and backward) and
    the backward stop are those of [`Freezer`]. What differs is the optimizer step, which updates each process's
    local shard: the frozen rows of a partly frozen tensor are translated into local coordinates of that shard (a
    process may hold none of them, or none of the tensor's rows), and after every step they and their optimizer
    state (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...) are written back on the local shard, so that they
    stay bit-identical on every process. The optimizer state rows are taken at the first step after the rows froze
    (a released unit resumes from the state it had when it froze).
    """

    def apply(self, unit_active: dict[tuple[int, str], torch.Tensor]) -> None:
        super().apply(unit_active)
        self._local_parts = [self._localize(q.param, q.dim, q.frozen) for q in self._partials]
        self._partials = []  # the parent's optimizer hooks act on whole tensors: not used here

    @torch.no_grad()
    def _localize(self, param: nn.Parameter, dim: int, frozen: torch.Tensor) -> _LocalPart:
        local = _local(param.detach())
        span = _shard_range(param, dim)
        if span is not None:
            start, stop = span
            frozen = frozen[(frozen >= start) & (frozen < stop)] - start
        frozen = frozen.to(local.device)
        return _LocalPart(param, dim, frozen, local.index_select(dim, frozen).clone())

    @torch.no_grad()
    def before_optimizer_step(self, optimizer) -> None:
        state = _torch_optimizer(optimizer).state
        for part in getattr(self, "_local_parts", []):
            if part.states is None:  # first step since these rows froze: their optimizer state is still theirs
                st = state.get(part.param, {})
                keys = _row_state_keys(st, part.param)
                part.states = {k: _local(st[k]).index_select(part.dim, part.frozen).clone() for k in keys}
                part.known = set(st)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer) -> None:
        state = _torch_optimizer(optimizer).state
        for part in getattr(self, "_local_parts", []):
            if part.frozen.numel() == 0:
                continue
            _local(part.param.detach()).index_copy_(part.dim, part.frozen, part.rows)
            st = state.get(part.param, {})
            for key in _row_state_keys(st, part.param):
                target = _local(st[key])
                saved = part.states.get(key) if part.states is not None else None
                if saved is not None:
                    target.index_copy_(part.dim, part.frozen, saved)
                elif part.states is not None and key not in part.known:
                    target.index_fill_(part.dim, part.frozen, 0)  # state created by this very step
                    part.states[key] = target.index_select(part.dim, part.frozen).clone()

    def release(self) -> None:
        super().release()
        self._local_parts = []
