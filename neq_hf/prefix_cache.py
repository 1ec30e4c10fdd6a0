"""A cache of what the frozen prefix computes for each training sample (`NEqConfig.cache_frozen_prefix`).

Once the embeddings and the bottom ``k`` layers are frozen, the hidden states entering layer ``k`` no longer change
for a given training sample. As AutoFreeze (Liu et al. 2021, arXiv 2102.01386) does, :class:`FrozenPrefixCache`
keeps them in CPU RAM (or a memory-mapped file) and feeds them to layer ``k`` instead of recomputing the prefix: when
every sample of a training batch is cached, the embeddings and the frozen layers do not run at all.

How it works, for a training forward (the model in training mode):

1. A forward pre-hook on the model reads the inputs and keys each sample by a hash of its real tokens (those where
   ``attention_mask`` is 1): their ids, their positions in the row, and their ``token_type_ids`` / ``position_ids``
   when given. Right padding to any batch length gives the same key; no change to the dataset is needed.
2. Samples not cached yet are computed by a separate forward of those samples only, with the whole model in eval
   mode and without gradients, stopped at the entry of layer ``k``; their real tokens' states are stored.
3. The training forward then runs with the embeddings replaced by zeros of their output shape (so the model body
   still builds its masks and rotary embeddings), the frozen layers passed through, and the cached states (re-padded
   with zeros to the batch's length) substituted at the entry of layer ``k``.

Dropout inside the frozen prefix is therefore off while the cache is in use (the prefix always runs as in eval
mode, cached or not), as in AutoFreeze; the trainable layers keep their dropout. Padded positions enter layer ``k``
as zeros: attention masks them out, so real tokens' outputs, the loss and every gradient are those of recomputation.

In the last epoch of a run (NEq sets ``reuse_ahead=False`` there), a training batch none of whose samples a training
forward cached runs the plain forward, the prefix with its dropout: nothing computed then would be read again. States
the held-out checks cached do not count, so a one-epoch run trains as without the cache, bit for bit, also when the
held-out samples are in the training set.

When more layers freeze (``k`` goes up), entries are extended lazily: the next time a sample is seen, only layers
``k_old .. k-1`` run on its cached states. When a layer is released (``k`` goes down) or a prefix parameter is
modified in place (a checkpoint loaded, ``Tensor._version`` changes), the cache is emptied. The cache is not saved
with checkpoints; a resumed run rebuilds it.

Memory: ``sum over cached samples of real_tokens x hidden_size x bytes_per_element`` (4 for float32), at most
``max_megabytes`` MiB, plus an index of about 200 bytes per sample. When the budget is full, new samples are no
longer stored (a warning says so): they are recomputed at every epoch, the cached ones are still served. Every
process of a multi-process run holds its own cache of the samples it has seen.

Supported: models that run each layer once, in order, with the hidden states as the layer's first input and its
output a tensor, and embedding modules whose output is ``(batch, tokens, width)`` (BERT, RoBERTa, ELECTRA,
DistilBERT, GPT-2, Llama, Mistral, Qwen2 in transformers 5). Refused with a ``ValueError``: gradient checkpointing
(it would re-run a layer's hooks during backward, after the cached states are gone) and models whose embeddings or
frozen layers are reused later in the forward. Training forwards with ``inputs_embeds``, ``output_hidden_states``,
``output_attentions``, ``use_cache`` or an input the key does not cover are run without the cache (a warning names
it). Evaluation (the model in eval mode) uses the cache only inside [`FrozenPrefixCache.serving_eval`], which NEq's
held-out checks use: in eval mode the cached states are exactly what the prefix computes. With
``serve_training=False`` only those checks use it (the default of NEq, `NEqConfig.checks_skip_frozen_prefix`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

_KEY_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# inputs that do not change what the frozen prefix computes
_NEUTRAL_INPUTS = ("labels", "num_items_in_batch", "return_dict", "logits_to_keep", "return_loss")


class _Stop(Exception):
    """Ends a prefix-only forward once the states entering the lowest trainable layer are captured."""


@dataclass
class _Entry:
    depth: int  # the layer whose input these states are (== number of layers run)
    offset: int  # first row in the arena
    rows: int  # real tokens
    trained: bool = False  # stored by a training forward (not only by a held-out check)


@dataclass
class _Plan:
    """What the hooks do during one forward. ``substitute_at``: the layer boundary (``i``: input of layer ``i``,
    ``n``: output of the last layer) where ``states`` replace the hidden states; everything below it is skipped.
    ``capture_at``: the boundary where the forward is stopped and the hidden states kept in ``captured``."""

    substitute_at: Optional[int] = None
    states: Optional[torch.Tensor] = None
    capture_at: Optional[int] = None
    captured: Optional[torch.Tensor] = None


class FrozenPrefixCache:
    """Per-sample cache of the hidden states entering the lowest trainable layer.

    Args:
        model (`nn.Module`): the module the training loop calls (a transformers model, possibly inside peft).
        layer_list (`nn.ModuleList`): its transformer layers (`UnitMap.layer_list`).
        max_megabytes (`float`): budget of the cached states, in MiB.
        path (`str`, *optional*): keep the states in a memory-mapped file at this path (scratch space, overwritten)
            instead of RAM.
        serve_training (`bool`, defaults to `True`): serve training forwards; `False` serves only forwards inside
            [`serving_eval`].

    Call [`locate`] once with a function that runs one forward pass before training; the cache then follows the
    parameters' ``requires_grad`` by itself at every training forward, and [`update`] applies a change at once.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_list: nn.ModuleList,
        max_megabytes: float = 1024,
        path: Optional[str] = None,
        serve_training: bool = True,
    ):
        if not max_megabytes > 0:
            raise ValueError(f"FrozenPrefixCache: max_megabytes={max_megabytes!r} must be > 0.")
        self.model = model
        self.layer_list = layer_list
        self.max_bytes = int(max_megabytes * 2**20)
        self.path = path
        self.serve_training = serve_training
        self._serve_eval = False
        self.depth = 0  # layers whose output is served from the cache
        # False once no training sample will be drawn again (the last epoch): a batch none of whose samples a training
        # forward cached then runs the plain forward (the prefix with its dropout, nothing stored), as its states would
        # not be read
        self.reuse_ahead = True
        self.stats = {
            "served": 0,
            "computed": 0,
            "extended": 0,
            "bypassed_batches": 0,
            "invalidations": 0,
            "plain_batches": 0,  # training batches run without the cache because nothing of them will be reused
        }
        self.peak = {"samples": 0, "megabytes": 0.0}  # largest size reached (kept after close())
        self._located = False
        self._plan: Optional[_Plan] = None
        self._busy = False
        self._index: dict[bytes, _Entry] = {}
        self._arena: Optional[torch.Tensor] = None
        self._used = 0
        self._versions: list[int] = []
        self._warned: set[str] = set()
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._prefix_params: list[nn.Parameter] = []
        self._layer_params = [list(layer.parameters()) for layer in layer_list]

    @property
    def located(self) -> bool:
        """Whether [`locate`] has installed the hooks (and not [`close`] removed them)."""
        return self._located

    # -- setup ----------------------------------------------------------------------------------------------------
    def locate(self, run_forward: Callable[[], Any]) -> None:
        """Find the modules that run before the first layer by watching one forward pass, check that the model is
        supported, and install the hooks."""
        if self._located:
            return
        if self.serve_training:
            self._refuse_checkpointing()
        names = {id(m): n for n, m in self.model.named_modules()}
        if id(self.layer_list) not in names:
            raise ValueError("FrozenPrefixCache: layer_list is not a submodule of model.")
        path = names[id(self.layer_list)]
        ancestors = {""} | {".".join(path.split(".")[:i]) for i in range(1, len(path.split(".")) + 1)}
        by_name = dict(self.model.named_modules())
        for name in ancestors:
            if name != path and any(True for _ in by_name[name].parameters(recurse=False)):
                raise _unsupported(f"module {name or type(self.model).__name__!r} owns parameters outside its layers")
        inside = {id(m) for layer in self.layer_list for m in layer.modules()}
        layer_ids = [id(layer) for layer in self.layer_list]
        calls: list[int] = []
        seen: dict[int, dict] = {}

        def before(module, args, kwargs):
            calls.append(id(module))

        def after(module, args, kwargs, output):
            if id(module) not in seen:
                seen[id(module)] = {"args": args, "kwargs": kwargs, "output": output}

        watched = [m for m in self.model.modules() if id(m) not in inside or id(m) in layer_ids]
        handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in watched]
        handles += [m.register_forward_hook(after, with_kwargs=True) for m in watched]
        try:
            run_forward()
        finally:
            for h in handles:
                h.remove()
        if [c for c in calls if c in set(layer_ids)] != layer_ids:
            raise _unsupported("its layers do not run once each, in order")
        first = calls.index(layer_ids[0])
        prefix = [by_name[names[c]] for c in dict.fromkeys(calls[:first]) if names[c] not in ancestors]
        for m in prefix:
            if calls.count(id(m)) > 1:
                raise _unsupported(f"{names[id(m)]!r} runs before the first layer and again later")
        top = [m for m in prefix if names[id(m)].rpartition(".")[0] in ancestors]
        for layer in self.layer_list:
            rec = seen[id(layer)]
            hidden = _hidden(rec["args"], rec["kwargs"])
            out = rec["output"]
            if not (torch.is_tensor(hidden) and torch.is_tensor(out) and hidden.shape == out.shape):
                raise _unsupported("a layer does not take the hidden states first and return them as a tensor")
        placeholders = []
        for m in top:
            if not any(True for _ in m.parameters()):
                continue  # rotary embeddings, dropout: cheap, and their outputs may be needed above
            rec = seen[id(m)]
            shape_from = _first_tensor(rec["args"], rec["kwargs"])
            out = rec["output"]
            if shape_from is None or not torch.is_tensor(out) or out.dim() != 3:
                raise _unsupported(f"{names[id(m)]!r} does not map (batch, tokens) inputs to (batch, tokens, width)")
            src = _pick(rec["args"], rec["kwargs"], shape_from)
            if tuple(out.shape[:2]) != tuple(src.shape[:2]):
                raise _unsupported(f"the output of {names[id(m)]!r} is not shaped like its input")
            placeholders.append((m, shape_from, out.shape[-1], out.dtype))
        self._prefix_params = list({id(p): p for m in top for p in m.parameters()}.values())
        self._install(placeholders)
        self._located = True
        self.update()

    def _install(self, placeholders) -> None:
        n = len(self.layer_list)
        for index, layer in enumerate(self.layer_list):
            self._handles.append(
                layer.register_forward_pre_hook(self._boundary_pre(index), with_kwargs=True, prepend=True)
            )
            self._patch(layer, self._passthrough(index, layer.forward))
        self._handles.append(self.layer_list[-1].register_forward_hook(self._boundary_post(n), prepend=True))
        for module, shape_from, width, dtype in placeholders:
            self._patch(module, self._placeholder(module.forward, shape_from, width, dtype))
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True))

    def _patch(self, module: nn.Module, forward) -> None:
        module.forward = forward
        self._patched.append(module)

    def close(self) -> None:
        """Remove every hook and patch and drop the cached states."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._patched:
            if "forward" in m.__dict__:
                del m.forward
        self._patched = []
        self.clear()
        self._arena = None
        self._located = False

    # -- what is frozen -------------------------------------------------------------------------------------------
    def update(self, freezer=None) -> int:
        """Follow the frozen prefix: serve from the entry of the lowest layer that has a trainable parameter (0 when
        the embeddings train), extend lazily when it goes up, empty the cache when it goes down or when a frozen
        parameter was modified. ``freezer`` is accepted for symmetry with the engine and not needed. Returns the
        depth."""
        if not self._located:
            return 0
        depth = 0
        for params in self._layer_params:
            if any(p.requires_grad for p in params):
                break
            depth += 1
        if depth and any(p.requires_grad for p in self._prefix_params):
            if "embeddings" not in self._warned:
                self._warned.add("embeddings")
                logger.warning(
                    "NEq frozen-prefix cache: %d layer(s) are frozen but the embeddings still train (tied to the "
                    "output head, or NEqConfig.freeze_embeddings=False), so nothing can be cached.",
                    depth,
                )
            depth = 0
        versions = self._version_sums(depth)
        old = min(len(self._versions), len(versions))
        if self._index and (depth < self.depth or versions[:old] != self._versions[:old]):
            self.clear()
            self.stats["invalidations"] += 1
        self.depth, self._versions = depth, versions
        return depth

    @property
    def computing(self) -> bool:
        """True during the cache's own prefix-only forwards (hooks reading layer outputs should ignore them)."""
        return self._busy

    def _version_sums(self, depth: int) -> list[int]:
        groups = [self._prefix_params] + self._layer_params[:depth]
        return [sum(p._version for p in group) for group in groups] if depth else []

    def clear(self) -> None:
        """Forget every cached state (the memory stays reserved for reuse)."""
        self._index = {}
        self._used = 0

    @property
    def megabytes(self) -> float:
        """MiB of cached states."""
        width = self._arena.shape[1] if self._arena is not None else 0
        elem = self._arena.element_size() if self._arena is not None else 0
        return self._used * width * elem / 2**20

    def __len__(self) -> int:
        return len(self._index)

    def summary(self) -> dict:
        return {
            "depth": self.depth,
            "samples": len(self),
            "megabytes": self.megabytes,
            "peak_samples": self.peak["samples"],
            "peak_megabytes": self.peak["megabytes"],
            **self.stats,
        }

    @contextlib.contextmanager
    def serving_eval(self) -> Iterator[None]:
        """Serve eval-mode forwards too while inside (the held-out checks): the prefix always runs as in eval mode,
        so in eval mode the cached states are exactly what it computes."""
        previous, self._serve_eval = self._serve_eval, True
        try:
            yield
        finally:
            self._serve_eval = previous

    # -- the training forward -------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        if self._busy:
            return None
        self._plan = None
        if module.training:
            if not self.serve_training:
                return None
            self._refuse_checkpointing()
        elif not self._serve_eval:
            return None
        depth = self.update()
        if depth == 0:
            return None
        inputs = self._prefix_inputs(args, kwargs)
        if inputs is None:
            self.stats["bypassed_batches"] += 1
            return None
        mask = _real_tokens(inputs)
        keys = _keys(inputs, mask)
        if module.training and not self.reuse_ahead and not any(self._trained(k) for k in keys):
            self.stats["plain_batches"] += 1
            return None
        states = self._states(keys, inputs, mask, depth, trained=module.training)
        self._plan = _Plan(substitute_at=depth, states=states)
        return None

    def _after_forward(self, module, args, kwargs, output):
        if not self._busy:
            self._plan = None

    def _prefix_inputs(self, args, kwargs) -> Optional[dict[str, torch.Tensor]]:
        kw = dict(kwargs)
        if len(args) > 1:
            return self._bypass("positional inputs beyond input_ids")
        if args:
            kw["input_ids"] = args[0]
        for flag in ("output_hidden_states", "output_attentions", "use_cache"):
            if kw.get(flag):
                return self._bypass(f"{flag}=True")
        if kw.get("inputs_embeds") is not None:
            return self._bypass("inputs_embeds")
        ids = kw.get("input_ids")
        if not torch.is_tensor(ids) or ids.dim() != 2:
            return self._bypass("input_ids missing or not (batch, tokens)")
        for name, value in kw.items():
            if torch.is_tensor(value) and name not in _KEY_INPUTS + _NEUTRAL_INPUTS:
                return self._bypass(f"input {name!r}")
        out = {"input_ids": ids}
        for name in _KEY_INPUTS[1:]:
            value = kw.get(name)
            if value is None:
                continue
            if not torch.is_tensor(value) or value.dim() != 2 or value.shape[1] != ids.shape[1]:
                return self._bypass(f"{name} not (batch, tokens)")
            if value.shape[0] not in (1, ids.shape[0]):
                return self._bypass(f"{name} not (batch, tokens)")
            out[name] = value.expand_as(ids)
        return out

    def _bypass(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("NEq frozen-prefix cache: forwards with %s run without the cache.", reason)
        return None

    def _trained(self, key: bytes) -> bool:
        entry = self._index.get(key)
        return entry is not None and entry.trained

    def _states(self, keys: list[bytes], inputs: dict, mask: torch.Tensor, depth: int, trained: bool) -> torch.Tensor:
        """The states entering layer ``depth`` for the batch, computing (and storing) the missing ones; ``trained``:
        for a training forward."""
        todo: dict[int, list[int]] = {}  # start depth -> samples to compute from there
        for i, key in enumerate(keys):
            entry = self._index.get(key)
            start = 0 if entry is None else entry.depth
            if start < depth:
                todo.setdefault(start, []).append(i)
        loose: dict[int, torch.Tensor] = {}  # computed but not stored (budget full)
        for start, idx in sorted(todo.items()):
            captured = self._compute(inputs, mask, keys, idx, start, depth)
            for j, i in enumerate(idx):
                rows = captured[j][mask[i]].cpu()
                if not self._store(keys[i], rows, depth, trained):
                    loose[i] = rows
            self.stats["extended" if start else "computed"] += len(idx)
        self.stats["served"] += len(keys) - sum(len(idx) for idx in todo.values())
        parts = [loose[i] if i in loose else self._rows(self._index[k]) for i, k in enumerate(keys)]
        return self._pad(parts, mask)

    def _compute(self, inputs, mask, keys, idx: list[int], start: int, depth: int) -> torch.Tensor:
        """Run the prefix for samples ``idx`` from boundary ``start`` (their cached states) up to layer ``depth``, as
        in eval mode and without gradients; returns ``(len(idx), tokens, width)``."""
        sel = torch.tensor(idx, device=inputs["input_ids"].device)
        sub = {name: value.index_select(0, sel) for name, value in inputs.items()}
        plan = _Plan(capture_at=depth)
        if start:
            plan.substitute_at = start
            plan.states = self._pad([self._rows(self._index[keys[i]]) for i in idx], mask[idx])
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self._busy, self._plan = True, plan
        try:
            with torch.no_grad():
                self.model(**sub)
        except _Stop:
            pass
        finally:
            for m, mode in modes:
                m.training = mode
            self._busy, self._plan = False, None
        if plan.captured is None:
            raise RuntimeError(f"NEq frozen-prefix cache: the forward pass did not reach layer {depth}.")
        return plan.captured

    # -- storage --------------------------------------------------------------------------------------------------
    def _store(self, key: bytes, rows: torch.Tensor, depth: int, trained: bool) -> bool:
        entry = self._index.get(key)
        if entry is not None and entry.depth == depth:
            entry.trained |= trained
            return True  # a duplicate within the batch
        if self._arena is None:
            self._allocate(rows.shape[1], rows.dtype)
        if entry is not None and entry.rows == rows.shape[0]:
            self._arena[entry.offset : entry.offset + entry.rows] = rows
            entry.depth = depth
            entry.trained |= trained
            return True
        if self._used + rows.shape[0] > self._arena.shape[0]:
            if entry is not None:
                del self._index[key]
            if "full" not in self._warned:
                self._warned.add("full")
                logger.warning(
                    "NEq frozen-prefix cache: the budget of %.0f MiB (NEqConfig.prefix_cache_megabytes) is full with "
                    "%d samples; the others are recomputed at every epoch. Raise the budget to cache them all.",
                    self.max_bytes / 2**20,
                    len(self._index),
                )
            return False
        self._arena[self._used : self._used + rows.shape[0]] = rows
        self._index[key] = _Entry(depth, self._used, rows.shape[0], trained)
        self._used += rows.shape[0]
        self.peak = {
            "samples": max(self.peak["samples"], len(self)),
            "megabytes": max(self.peak["megabytes"], self.megabytes),
        }
        return True

    def _allocate(self, width: int, dtype: torch.dtype) -> None:
        capacity = self.max_bytes // (width * torch.empty((), dtype=dtype).element_size())
        if self.path is not None:
            self._arena = torch.from_file(self.path, shared=True, size=capacity * width, dtype=dtype)
            self._arena = self._arena.view(capacity, width)
        else:
            # pages are committed only when written, so an unused budget costs no RAM
            self._arena = torch.empty((capacity, width), dtype=dtype)

    def _rows(self, entry: _Entry) -> torch.Tensor:
        return self._arena[entry.offset : entry.offset + entry.rows]

    def _pad(self, parts: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        rows = torch.cat(parts) if parts else self._arena[:0]
        states = torch.zeros(mask.shape + (rows.shape[-1],), dtype=rows.dtype, device=mask.device)
        states[mask] = rows.to(mask.device, non_blocking=True)
        return states

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _boundary_pre(self, index: int):
        def hook(module, args, kwargs):
            plan = self._plan
            if plan is None:
                return None
            if plan.capture_at == index:
                plan.captured = _hidden(args, kwargs).detach()
                raise _Stop
            if plan.substitute_at == index:
                if args:
                    return (plan.states,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": plan.states}
            return None

        return hook

    def _boundary_post(self, index: int):
        def hook(module, args, output):
            plan = self._plan
            if plan is None:
                return None
            if plan.capture_at == index:
                plan.captured = output.detach()
                raise _Stop
            if plan.substitute_at == index:
                return plan.states
            return None

        return hook

    def _passthrough(self, index: int, forward):
        def passthrough(*args, **kwargs):
            plan = self._plan
            if plan is not None and plan.substitute_at is not None and index < plan.substitute_at:
                return _hidden(args, kwargs)
            return forward(*args, **kwargs)

        return passthrough

    def _placeholder(self, forward, shape_from, width: int, dtype: torch.dtype):
        def placeholder(*args, **kwargs):
            plan = self._plan
            if plan is not None and plan.substitute_at is not None:
                src = _pick(args, kwargs, shape_from)
                return torch.zeros(tuple(src.shape[:2]) + (width,), dtype=dtype, device=src.device)
            return forward(*args, **kwargs)

        return placeholder

    def _refuse_checkpointing(self) -> None:
        if any(getattr(layer, "gradient_checkpointing", False) for layer in self.layer_list):
            raise ValueError(
                "NEqConfig.cache_frozen_prefix=True does not work with gradient checkpointing (a checkpointed layer "
                "re-runs its forward during backward, after the cached states are gone). Set "
                "gradient_checkpointing=False or cache_frozen_prefix=False."
            )


def _unsupported(why: str) -> ValueError:
    return ValueError(
        f"NEqConfig.cache_frozen_prefix=True does not support this model: {why}. Set cache_frozen_prefix=False."
    )


def _hidden(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states")


def _first_tensor(args, kwargs):
    for i, a in enumerate(args):
        if torch.is_tensor(a):
            return ("arg", i)
    for name, v in kwargs.items():
        if torch.is_tensor(v):
            return ("kw", name)
    return None


def _pick(args, kwargs, where):
    kind, at = where
    return args[at] if kind == "arg" else kwargs[at]


def _real_tokens(inputs: dict) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    return mask != 0


def _keys(inputs: dict, mask: torch.Tensor) -> list[bytes]:
    """One key per sample: a hash of its real tokens' ids, positions in the row and, when given, token types and
    position ids."""
    m = mask.cpu().numpy()
    named = [
        (name.encode(), inputs[name].cpu().numpy().astype(np.int64))
        for name in ("input_ids", "token_type_ids", "position_ids")
        if name in inputs
    ]
    keys = []
    for i in range(m.shape[0]):
        pos = np.flatnonzero(m[i])
        h = hashlib.blake2b(pos.astype(np.int64).tobytes(), digest_size=16)
        for name, values in named:
            h.update(name)
            h.update(values[i, pos].tobytes())
        keys.append(h.digest())
    return keys
