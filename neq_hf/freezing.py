"""Turning unit masks into exact, cheap freezing.

What a frozen unit costs nothing for, and why its parameters stay bit-identical:

1. A tensor whose units are all frozen gets ``requires_grad=False`` and no ``.grad``: autograd computes no weight
   gradient for it, and torch optimizers skip parameters without a gradient (no moment update, no weight decay, no
   step count), so it stays bit-identical and so does its optimizer state.
2. Backward stops below the lowest layer that still has a trainable unit: the hidden states entering that layer are
   detached (when the embeddings freeze too, see ``NEqConfig.freeze_embeddings``), so nothing beneath is
   back-propagated, whatever ``enable_input_require_grads()`` or tied embeddings would otherwise force.
3. A partly frozen weight runs :class:`RowSparseGradLinear`: the forward pass is the dense one; backward computes the
   input gradient as usual but the weight gradient only for the active rows (or columns), with exact zeros
   elsewhere. When few rows are frozen (below ``row_sparse_min_frozen``) the gathers cost more than they save, so
   the weight gradient is computed densely and its frozen rows are zeroed.
4. Optimizers update whole tensors, so a partly frozen tensor's frozen rows would still move through momentum, weight
   decay or second-moment decay. With torch's ``Adam``/``AdamW`` (fused or not, the Trainer's ``adamw_torch`` and
   ``adamw_torch_fused``) and ``SGD``, a tensor with at least ``masked_min_frozen`` of its rows frozen is stepped
   by :func:`_masked_step`: its gradient is hidden from the optimizer's own step, and torch's functional update runs
   on copies of its active rows only (parameter, gradient, moments), which are then scattered back. Frozen rows and
   their optimizer state are never read or written; the per-tensor ``step`` counter advances as torch's would. The
   update is torch's own code on the same values, so active rows get exactly what the optimizer would give them.
   Other optimizers (and steps under a gradient scaler, which may skip them, or tensors without optimizer state yet)
   use the write-back: the frozen rows of the parameter and of every same-shaped optimizer state (``exp_avg``,
   ``exp_avg_sq``, ``momentum_buffer``...) are copied when they freeze and written back after every optimizer step.
   Either way a released unit resumes from exactly the optimizer state it had when it froze. The copies cost memory:
   the frozen rows of partly frozen tensors, plus (write-back only) those rows of each optimizer state.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .units import Binding, UnitMap

# Fraction of frozen rows from which a partly frozen tensor is stepped on its active rows only. Measured on MiniLM
# (CPU, fused AdamW, optimizer step alone): copying the active rows out and back costs more than stepping the whole
# tensor and writing the frozen rows back up to about 75% frozen rows (60%: 59 vs 50 ms; 75%: 50 vs 50 ms; 90%: 37
# vs 47 ms, the plain step 22 ms).
MASKED_MIN_FROZEN = 0.75


class RowSparseGradLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` whose backward computes the weight gradient only for ``active`` output rows
    (``axis_out=True``) or input columns (``axis_out=False``) of ``W``. ``transposed`` means ``W`` is stored
    ``(in, out)`` as in transformers' ``Conv1D``. Under autocast the dense forward dtype is kept in backward.

    Given ``frozen`` (the complement of ``active``), the weight gradient is computed densely and its frozen rows are
    zeroed instead: the gathers of the row-sparse product cost more than they save when few rows are frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, active, axis_out: bool, transposed: bool, frozen=None):
        dtype = None
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype) if dtype is not None else x
            wc = weight.to(dtype) if dtype is not None else weight
            bc = bias.to(dtype) if (dtype is not None and bias is not None) else bias
            w_oi = wc.t() if transposed else wc
            y = F.linear(xc, w_oi, bc)
        ctx.save_for_backward(xc, wc, active, frozen)
        ctx.axis_out, ctx.transposed = axis_out, transposed
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w, active, frozen = ctx.saved_tensors
        w_oi = w.t() if ctx.transposed else w  # (out, in) view
        grad_y = grad_y.to(x.dtype)
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(w_oi)
        if ctx.needs_input_grad[1]:
            if frozen is not None:
                # dense product in the weight's own layout, then exact zeros in the frozen rows/columns
                grad_w = (x2.t().matmul(g2) if ctx.transposed else g2.t().matmul(x2)).to(ctx.weight_dtype)
                out_dim = 1 if ctx.transposed else 0
                grad_w.index_fill_(out_dim if ctx.axis_out else 1 - out_dim, frozen, 0)
            else:
                grad_w = torch.zeros(w.shape, dtype=ctx.weight_dtype, device=w.device)
                if ctx.axis_out:
                    rows = g2.index_select(1, active).t().matmul(x2)  # (active, in)
                else:
                    rows = g2.t().matmul(x2.index_select(1, active))  # (out, active)
                rows = (rows.t() if ctx.transposed else rows).to(ctx.weight_dtype)  # in the weight's layout
                out_dim = 1 if ctx.transposed else 0
                _put(grad_w, out_dim if ctx.axis_out else 1 - out_dim, active, rows)
        if ctx.needs_input_grad[2]:
            full = g2.sum(0)
            if ctx.axis_out:
                grad_b = torch.zeros(full.shape, dtype=ctx.bias_dtype, device=full.device)
                grad_b.index_copy_(0, active, full.index_select(0, active).to(ctx.bias_dtype))
            else:
                grad_b = full.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _row_sparse_forward(self, x):
    weight = self.weight
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return self._neq_dense_forward(x)
    out_shape = x.shape[:-1] + (weight.shape[1] if self._neq_transposed else weight.shape[0],)
    y = RowSparseGradLinear.apply(
        x, weight, self.bias, self._neq_active, self._neq_axis_out, self._neq_transposed, self._neq_frozen
    )
    return y.reshape(out_shape)


@dataclass
class _Partial:
    """A partly frozen tensor: its frozen and active indices along ``dim`` and the frozen values when they froze."""

    param: nn.Parameter
    dim: int
    frozen: torch.Tensor
    active: torch.Tensor
    rows: torch.Tensor
    # optimizer state rows, taken at the first write-back step after freezing (None: not taken yet); state created
    # later (``known`` lacks its key) keeps the initial zeros in frozen rows.
    states: Optional[dict[str, torch.Tensor]] = None
    known: set = field(default_factory=set)
    # set between the two optimizer hooks when this tensor is stepped by the masked step: its hidden gradient
    grad: Optional[torch.Tensor] = None


_PATCH_ATTRS = (
    "_neq_dense_forward",
    "_neq_own_forward",
    "_neq_active",
    "_neq_frozen",
    "_neq_axis_out",
    "_neq_transposed",
)


class Freezer:
    """Applies unit masks to a model. Only parameters that were trainable when it was built are ever touched.

    ``row_sparse_min_frozen``: fraction of frozen rows from which a partly frozen weight's gradient is computed for
    its active rows only. ``masked_min_frozen``: fraction of frozen rows from which a partly frozen tensor's optimizer
    step runs on its active rows only (above 1: never; see the module docstring, item 4)."""

    def __init__(
        self,
        model: nn.Module,
        unit_map: UnitMap,
        freeze_embeddings: bool = True,
        row_sparse_min_frozen: float = 0.4,
        masked_min_frozen: float = MASKED_MIN_FROZEN,
    ):
        self.model = model
        self.unit_map = unit_map
        self.freeze_embeddings = freeze_embeddings
        self.row_sparse_min_frozen = row_sparse_min_frozen
        self.masked_min_frozen = masked_min_frozen
        self.managed: dict[int, nn.Parameter] = {id(p): p for p in model.parameters() if p.requires_grad}
        self.below: list[nn.Parameter] = []  # parameters that only run before the first layer (embeddings)
        self._patched: dict[int, nn.Module] = {}
        self._partials: list[_Partial] = []
        self._workspace: dict[str, torch.Tensor] = {}  # buffers of the masked optimizer step
        self._stop_handle = None
        self.stop_layer = 0  # backward runs down to this layer's input

    # -- where backward may stop ------------------------------------------------------------------------------
    def locate_embeddings(self, model: nn.Module, run_forward) -> None:
        """Find the parameters that only act before the first layer by watching one forward pass.

        A parameter shared with a module that runs after the first layer (a tied ``lm_head``) is not one of them.
        """
        order, counter = {}, [0]
        first_layer = self.unit_map.layer_list[0]
        layer_modules = {id(m) for m in self.unit_map.layer_list.modules()}

        def mark(module, *_):
            order.setdefault(id(module), counter[0])
            counter[0] += 1

        handles = [m.register_forward_pre_hook(mark) for m in model.modules() if id(m) not in layer_modules]
        handles.append(first_layer.register_forward_pre_hook(mark))
        try:
            run_forward()
        finally:
            for h in handles:
                h.remove()
        start = order.get(id(first_layer))
        if start is None:
            self.below = []
            return
        owners: dict[int, list[int]] = {}
        for module in model.modules():
            if id(module) in layer_modules:
                continue
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(order.get(id(module), -1))
        self.below = [
            self.managed[pid]
            for pid, seen in owners.items()
            if pid in self.managed and all(0 <= s < start for s in seen)
        ]

    # -- applying masks ---------------------------------------------------------------------------------------
    def apply(self, unit_active: dict[tuple[int, str], torch.Tensor]) -> None:
        """Set requires_grad, row-sparse backward and the backward stop from ``unit_active[(layer, kind)]``."""
        want: dict[int, bool] = {}
        partials: list[_Partial] = []
        layer_frozen = []
        for layer in self.unit_map.layers:
            active = {
                kind: unit_active.get((layer.index, kind), torch.ones(layer.num_units(kind), dtype=torch.bool))
                for kind in ("heads", "neurons")
            }
            layer_frozen.append(not any(bool(a.any()) for a in active.values()))
            for b in layer.bindings:
                feat = b.feature_active(active[b.kind]).to(b.weight.device)
                n_active = int(feat.sum())
                all_on, all_off = n_active == feat.numel(), n_active == 0
                for p in [b.weight] + ([b.bias] if b.bias is not None else []):
                    want[id(p)] = not all_off
                for p in b.companions:
                    want[id(p)] = not all_off
                if all_on or all_off:
                    self._unpatch(b.module)
                    continue
                frozen_idx, active_idx = (~feat).nonzero().flatten(), feat.nonzero().flatten()
                partials.append(_snapshot(b.weight, b.weight_dim(), frozen_idx, active_idx))
                if b.bias is not None:
                    partials.append(_snapshot(b.bias, 0, frozen_idx, active_idx))
                dense = frozen_idx.numel() < self.row_sparse_min_frozen * feat.numel()
                self._patch(b, active_idx, frozen_idx if dense else None)
            for p in layer.others:
                want[id(p)] = not layer_frozen[-1]
        embeddings_frozen = self.freeze_embeddings and layer_frozen[0]
        for p in self.below:
            want[id(p)] = not embeddings_frozen

        for pid, trainable in want.items():
            p = self.managed.get(pid)
            if p is None:
                continue  # frozen by the user: never touched
            if p.requires_grad != trainable:
                p.requires_grad_(trainable)
            if not trainable:
                p.grad = None
        self._partials = [q for q in partials if id(q.param) in self.managed]

        stop = 0
        if self.freeze_embeddings:
            while stop < len(layer_frozen) and layer_frozen[stop]:
                stop += 1
        self._set_stop(stop)

    def _patch(self, b: Binding, active_idx: torch.Tensor, dense_frozen: Optional[torch.Tensor]) -> None:
        m = b.module
        # Idempotent, also across Freezers: a module still patched (by an interrupted run's Freezer) keeps its
        # original forward, never a wrapper of the wrapper (which would recurse).
        if "_neq_dense_forward" not in m.__dict__:
            m._neq_own_forward = "forward" in m.__dict__  # an instance-level forward (e.g. a hook) to restore
            m._neq_dense_forward = m.forward
            m.forward = types.MethodType(_row_sparse_forward, m)
        self._patched[id(m)] = m
        m._neq_active = active_idx
        m._neq_frozen = dense_frozen
        m._neq_axis_out = b.axis == "out"
        m._neq_transposed = b.transposed

    def _unpatch(self, m: nn.Module) -> None:
        self._patched.pop(id(m), None)
        if "_neq_dense_forward" not in m.__dict__:
            return
        if m.__dict__.get("_neq_own_forward"):
            m.forward = m._neq_dense_forward
        else:
            del m.forward
        for attr in _PATCH_ATTRS:
            m.__dict__.pop(attr, None)

    def _set_stop(self, stop: int) -> None:
        if stop == self.stop_layer and (self._stop_handle is not None or stop == 0):
            return
        if self._stop_handle is not None:
            self._stop_handle.remove()
            self._stop_handle = None
        self.stop_layer = stop
        layers = self.unit_map.layer_list
        if stop == 0:
            return
        checkpointing = bool(
            getattr(self.model, "is_activation_checkpointing", None)
            or getattr(self.model, "gradient_checkpointing", False)
        )
        if stop < len(layers):

            def detach_input(module, args, kwargs):
                if args:
                    return (_cut(args[0], checkpointing),) + tuple(args[1:]), kwargs
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": _cut(kwargs["hidden_states"], checkpointing)}
                return None

            self._stop_handle = layers[stop].register_forward_pre_hook(detach_input, with_kwargs=True)
        else:

            def detach_output(module, args, output):
                if isinstance(output, torch.Tensor):
                    return output.detach()
                if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                    return (output[0].detach(),) + tuple(output[1:])
                return None

            self._stop_handle = layers[-1].register_forward_hook(detach_output)

    def release(self) -> None:
        """Undo everything: trainable again, dense forward, no backward stop."""
        for p in self.managed.values():
            p.requires_grad_(True)
        for m in list(self._patched.values()):
            self._unpatch(m)
        self._partials = []
        self._workspace = {}
        self._set_stop(0)

    # -- exactness around the optimizer step ------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self, optimizer) -> None:
        """Hide the gradients of tensors the masked step will update; snapshot the optimizer state of the others."""
        opt = _torch_optimizer(optimizer)
        kind = _masked_kind(optimizer)
        groups = {}
        if kind is not None and any(
            q.frozen.numel() >= self.masked_min_frozen * q.param.shape[q.dim] for q in self._partials
        ):
            groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        for part in self._partials:
            p = part.param
            group = groups.get(id(p))
            if (
                group is not None
                and p.grad is not None
                and part.frozen.numel() >= self.masked_min_frozen * p.shape[part.dim]
                and _state_ready(kind, opt.state.get(p), group, p)
            ):
                part.grad, p.grad = p.grad, None  # the optimizer's own step skips a tensor without gradient
                continue
            if part.states is None:  # first step since these rows froze: their optimizer state is still theirs
                st = opt.state.get(p, {})
                part.states = {k: st[k].index_select(part.dim, part.frozen) for k in _row_state_keys(st, p)}
                part.known = set(st)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer) -> None:
        """Step the active rows of the tensors hidden before the step; write frozen rows back in the others."""
        opt = _torch_optimizer(optimizer)
        masked = [q for q in self._partials if q.grad is not None]
        if masked:
            _masked_step(opt, _masked_kind(optimizer), masked, self._workspace)
        for part in self._partials:
            p = part.param
            if part.grad is not None:
                p.grad, part.grad = part.grad, None
                continue
            _put(p, part.dim, part.frozen, part.rows)
            st = opt.state.get(p, {})
            for key in _row_state_keys(st, p):
                saved = part.states.get(key) if part.states is not None else None
                if saved is not None:
                    _put(st[key], part.dim, part.frozen, saved)
                elif part.states is not None and key not in part.known:
                    # state created by this very step: frozen rows keep the initial zeros
                    st[key].index_fill_(part.dim, part.frozen, 0)
                    part.states[key] = st[key].index_select(part.dim, part.frozen)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.managed.values() if p.requires_grad)


def _snapshot(param: nn.Parameter, dim: int, frozen: torch.Tensor, active: torch.Tensor) -> _Partial:
    if getattr(param, "_local_tensor", None) is not None:
        # an FSDP2 (DTensor) shard: its rows are read on the local shard by neq_hf.distributed.ShardedFreezer
        return _Partial(param, dim, frozen, active, frozen.new_empty(0))
    return _Partial(param, dim, frozen, active, param.detach().index_select(dim, frozen))


def _put(target: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> None:
    """``target.index_copy_(dim, index, source)``; along a strided dimension ``scatter_`` with an expanded index is
    several times faster on CPU for the same copy."""
    if dim == 0:
        target.index_copy_(0, index, source)
    else:
        shape = [1] * source.dim()
        shape[dim] = -1
        target.scatter_(dim, index.view(shape).expand_as(source), source)


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _masked_kind(optimizer) -> Optional[str]:
    """``"adam"`` or ``"sgd"`` when the masked step can reproduce this optimizer's update, else None."""
    wrapper = optimizer
    while True:
        if getattr(wrapper, "scaler", None) is not None:
            return None  # a gradient scaler may skip the step after the hooks ran
        if not hasattr(wrapper, "optimizer"):
            break
        wrapper = wrapper.optimizer
    opt = wrapper
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return None
    if any(g.get("differentiable") or g.get("capturable") for g in opt.param_groups):
        return None
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    if type(opt) is torch.optim.SGD:
        return "sgd"
    return None


def _state_ready(kind: str, state: Optional[dict], group: dict, param: torch.Tensor) -> bool:
    """The tensor's optimizer state exists (the optimizer creates it at its first step) and is plain."""
    if torch.is_complex(param):
        return False
    if kind == "adam":
        keys = _ADAM_STATE + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        return state is not None and all(k in state for k in keys)
    return group["momentum"] == 0 or (state is not None and state.get("momentum_buffer") is not None)


# CPU fused kernels split tensors at multiples of 16 elements and run SIMD vectors over each piece, then scalar code
# (rounded differently) over the last ``numel % vector_width`` elements. Copies of active rows padded to a multiple
# of 64, plus the original tensor's last ``numel % 64`` elements stepped as a tensor of their own, put every element
# on the same code path as in the whole-tensor step, for any vector width dividing 64.
_ALIGN = 64
# Elements per optimizer tensor (parameter, gradient, each moment) in the reusable buffers that hold active rows
# (4 MiB each in float32); tensors are stepped in batches that fit, a larger tensor gets buffers of its own size.
_WORKSPACE_ELEMENTS = 1 << 20


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _tail_active(part: _Partial) -> Optional[torch.Tensor]:
    """Which of the last ``numel % 64`` elements of the (contiguous) tensor are in active rows; None when none."""
    p = part.param
    r = p.numel() % _ALIGN
    if r == 0:
        return None
    flat = torch.arange(p.numel() - r, p.numel(), device=p.device)
    rows = (flat // _numel(p.shape[part.dim + 1 :])) % p.shape[part.dim]
    active = torch.zeros(p.shape[part.dim], dtype=torch.bool, device=p.device)
    active[part.active] = True
    return active[rows]


@torch.no_grad()
def _masked_step(opt: torch.optim.Optimizer, kind: str, parts: list[_Partial], workspace: dict) -> None:
    """Torch's functional Adam/AdamW or SGD update on the active rows of ``parts`` (their gradients in ``part.grad``),
    with each tensor's own param group hyper-parameters, then the rows scattered back.

    Active rows are copied into ``workspace`` buffers that live across steps (fresh allocations of this size cost
    page faults every step)."""
    by_group = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    batches: dict[int, list[_Partial]] = {}
    for part in parts:
        batches.setdefault(by_group[id(part.param)], []).append(part)
    for gi, group_parts in batches.items():
        group = opt.param_groups[gi]
        if kind == "adam":
            keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        else:
            keys = ("momentum_buffer",) if group["momentum"] != 0 else ()
        chunk, used = [], 0
        for part in group_parts:
            shape = list(part.param.shape)
            shape[part.dim] = part.active.numel()
            size = -(-_numel(shape) // _ALIGN) * _ALIGN
            if chunk and used + size > _WORKSPACE_ELEMENTS:
                _step_chunk(opt, kind, group, keys, chunk, workspace)
                chunk, used = [], 0
            chunk.append((part, shape, used))
            used += size
        _step_chunk(opt, kind, group, keys, chunk, workspace)


def _step_chunk(opt, kind: str, group: dict, keys: tuple, chunk: list, workspace: dict) -> None:
    from torch.optim.adam import adam
    from torch.optim.sgd import sgd

    part0 = chunk[0][0]
    total = chunk[-1][2] + -(-_numel(chunk[-1][1]) // _ALIGN) * _ALIGN
    roles = ("param", "grad") + keys
    for role in roles:
        buf = workspace.get(role)
        if buf is None or buf.numel() < total or buf.dtype != part0.param.dtype or buf.device != part0.param.device:
            workspace[role] = torch.empty(
                max(total, _WORKSPACE_ELEMENTS), dtype=part0.param.dtype, device=part0.param.device
            )
    fused_cpu = bool(group["fused"]) and part0.param.device.type == "cpu"
    flat = {role: [] for role in roles}  # what the optimizer steps: 64-aligned slices of the workspace
    shaped = {role: [] for role in roles}  # the same memory, shaped like the active rows
    steps, tails = [], []
    for part, shape, offset in chunk:
        st = opt.state[part.param]
        whole = {"param": part.param, "grad": part.grad, **{k: st[k] for k in keys}}
        n = _numel(shape)
        size = -(-n // _ALIGN) * _ALIGN
        for role in roles:
            # the padding's values are stepped and discarded: whatever they hold cannot reach a parameter
            slot = workspace[role][offset : offset + size]
            rows = slot[:n].view(shape)
            torch.index_select(whole[role], part.dim, part.active, out=rows)
            flat[role].append(slot)
            shaped[role].append(rows)
        if kind == "adam":
            steps.append(st["step"])
        if fused_cpu and all(t.is_contiguous() for t in whole.values()):
            tail = _tail_active(part)
            if tail is not None:
                tails.append((part, tail))
    for part, tail in tails:
        st, r = opt.state[part.param], tail.numel()
        whole = {"param": part.param, "grad": part.grad, **{k: st[k] for k in keys}}
        for role in roles:
            flat[role].append(whole[role].view(-1)[-r:].clone())
        if kind == "adam":
            steps.append(st["step"].clone())  # counted once, by the row copy's step above
    if kind == "adam":
        beta1, beta2 = group["betas"]
        adam(
            flat["param"],
            flat["grad"],
            flat["exp_avg"],
            flat["exp_avg_sq"],
            flat.get("max_exp_avg_sq", []),
            steps,
            foreach=group["foreach"],
            fused=group["fused"],
            decoupled_weight_decay=group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
    else:
        sgd(
            flat["param"],
            flat["grad"],
            flat.get("momentum_buffer", []),
            foreach=group["foreach"],
            fused=group["fused"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
    written = ("param",) + keys
    for i, (part, _, _) in enumerate(chunk):
        st = opt.state[part.param]
        whole = {"param": part.param, **{k: st[k] for k in keys}}
        for role in written:
            _put(whole[role], part.dim, part.active, shaped[role][i])
    for j, (part, tail) in enumerate(tails, start=len(chunk)):
        st = opt.state[part.param]
        whole = {"param": part.param, **{k: st[k] for k in keys}}
        for role in written:
            end = whole[role].view(-1)[-tail.numel() :]
            end.copy_(torch.where(tail, flat[role][j], end))


def _row_state_keys(state: dict, param: torch.Tensor) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape]


def _cut(hidden, checkpointing: bool):
    if not isinstance(hidden, torch.Tensor):
        return hidden
    out = hidden.detach()
    # Reentrant activation checkpointing only back-propagates into a segment whose inputs require grad.
    return out.requires_grad_(True) if checkpointing and torch.is_grad_enabled() else out


def _torch_optimizer(optimizer):
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
