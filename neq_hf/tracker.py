"""State of NEq over checks: reference outputs, similarity, velocity, masks and history."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

from .config import NEqConfig
from .equilibrium import (
    at_equilibrium,
    cosine_from_sums,
    layer_rule,
    relative_equilibrium,
    relative_scale,
    still,
    velocity,
)
from .units import UnitMap

Key = tuple[int, str]


class EquilibriumTracker:
    """Runs the held-out checks and decides which units are at equilibrium.

    Check ``t = 0`` only records reference outputs; every later check computes, per unit, the three sums of the
    cosine against the previous outputs (summed across processes by ``all_reduce``), then phi, the velocity and the
    decision of :mod:`neq_hf.equilibrium`.
    """

    def __init__(self, unit_map: UnitMap, config: NEqConfig):
        self.config = config
        self.keys: list[Key] = [(layer.index, kind) for layer in unit_map.layers for kind in config.unit_kinds]
        self.num_units = {k: unit_map.layers[k[0]].num_units(k[1]) for k in self.keys}
        self.t = 0  # checks done, the reference included
        self.reference: dict[Key, torch.Tensor] = {}
        # Rows of this process's reference (held-out samples, or their real tokens with token_pooling="none"). Set
        # before the first check (neq_hf.holdout.plan_reference), the reference is written into one tensor per key
        # allocated at its first batch; left unset, the first check's batches are concatenated, which holds the
        # reference twice at that moment.
        self.reference_rows: Optional[int] = None
        self.phi = {k: torch.full((n,), math.nan) for k, n in self.num_units.items()}
        self.v = {k: torch.full((n,), math.nan) for k, n in self.num_units.items()}
        self.frozen = {k: torch.zeros(n, dtype=torch.bool) for k, n in self.num_units.items()}
        self.equilibrium = {k: torch.zeros(n, dtype=torch.bool) for k, n in self.num_units.items()}
        self.layers = sorted({k[0] for k in self.keys})
        self.scale = {kind: math.nan for kind in config.unit_kinds}  # s_k of the relative rule at the last check
        # NEqConfig.settle_fraction: the largest s_k so far, and whether the last check's s_k had fallen below
        # settle_fraction of it (no new freezing otherwise)
        self.scale_peak = {kind: math.nan for kind in config.unit_kinds}
        self.settled = True
        self.layers_frozen = 0  # bottom layers frozen whole by the layer rule
        # per unit group, the units at rest by the relative rule that NEqConfig.eps_relative_max kept from it at the
        # last check
        self.capped: dict[Key, int] = {}
        self.history: list[dict] = []
        # Bottom layers whose outputs cannot change (nothing in them or below them trains: the frozen prefix); a
        # held-out pass may leave them out, set by the caller for the duration of a check.
        self.constant_layers = 0
        self.fingerprints: dict = {}  # what this state belongs to (unit map, held-out split), set by neq_hf.NEq
        # The training-progress gate (NEqConfig.min_loss_drop), kept by the caller: while ``hold`` is set a check
        # measures but freezes nothing; ``loss_start`` is the loss it compares with, ``gate_step`` the step at which
        # the gate opened (None: not yet).
        self.hold = False
        # NEqConfig.granularity with "auto" resolved by the caller (neq_hf.NEq: from the model's device)
        self.granularity = "unit" if config.granularity == "auto" else config.granularity
        self.loss_start: Optional[float] = None
        self.gate_step: Optional[int] = None

    # -- one check -------------------------------------------------------------------------------------------
    def check(self, run_pass: Callable[[Callable], None], all_reduce: Optional[Callable] = None) -> dict:
        """Run one held-out pass (``run_pass(on_batch)``) and update the state; returns this check's figures."""
        sums = {k: torch.zeros(3, n, dtype=torch.float64) for k, n in self.num_units.items()}
        chunks: dict[Key, list[torch.Tensor]] = {k: [] for k in self.keys}
        first = self.t == 0
        preallocate = first and self.reference_rows is not None
        if first:
            self.reference = {}
        rows_seen = [0]

        def on_batch(start: int, pooled: dict[Key, torch.Tensor]) -> None:
            rows = None
            for key in self.keys:
                cur = pooled.get(key)
                if cur is None:
                    # a layer of the frozen prefix that the pass skipped (see `constant_layers`): its outputs are
                    # those of the last check
                    if first or key[0] >= self.constant_layers:
                        raise ValueError(f"The NEq held-out pass gave no outputs for layer {key[0]} ({key[1]}).")
                    if rows is None:
                        rows = next(v.shape[0] for v in pooled.values())
                    cur = self.reference[key][start : start + rows]
                end = start + cur.shape[0]
                rows_seen[0] = max(rows_seen[0], end)
                if first and not preallocate:
                    chunks[key].append(cur)
                    continue
                if preallocate and key not in self.reference:
                    self.reference[key] = cur.new_empty((self.reference_rows, cur.shape[1]))
                ref = self.reference[key]
                if end > ref.shape[0]:
                    raise self._rows_error(end, ref.shape[0])
                if first:
                    ref[start:end] = cur
                    continue
                prev = ref[start:end]
                n = self.num_units[key]
                c, p = cur.reshape(cur.shape[0], n, -1), prev.reshape(prev.shape[0], n, -1)
                s = torch.stack([(c * p).sum((0, 2)), (p * p).sum((0, 2)), (c * c).sum((0, 2))])
                sums[key] += s.double().cpu()
                ref[start:end] = cur

        run_pass(on_batch)
        if first and not preallocate:
            self.reference = {k: torch.cat(v) for k, v in chunks.items()}
        expected = next(iter(self.reference.values())).shape[0] if self.reference else 0
        if rows_seen[0] != expected:
            raise self._rows_error(rows_seen[0], expected)
        if first:
            self.t = 1
            return self._figures(nonfinite=0)

        flat = torch.cat([sums[k].flatten() for k in self.keys])
        if all_reduce is not None:
            flat = all_reduce(flat)
        offset = 0
        nonfinite = 0
        for key in self.keys:
            n = self.num_units[key]
            dot, sq_prev, sq_cur = flat[offset : offset + 3 * n].view(3, n)
            offset += 3 * n
            phi = cosine_from_sums(dot, sq_prev, sq_cur).float()
            self.v[key] = velocity(phi, self.phi[key], self.v[key], self.config.mu).float()
            self.phi[key] = phi
            nonfinite += int((~torch.isfinite(phi)).sum())
        self._update_scale()
        self._decide()
        self.t += 1
        return self._figures(nonfinite=nonfinite)

    def _update_scale(self) -> None:
        """The scale of the relative rule: per kind, the largest per-layer median change (1 - phi) at this check."""
        settled = True
        for kind in self.config.unit_kinds:
            s = relative_scale([self.phi[k] for k in self.keys if k[1] == kind])
            self.scale[kind] = s
            if s == s:
                peak = self.scale_peak[kind]
                self.scale_peak[kind] = s if not peak == peak else max(peak, s)
                if self.config.settle_fraction > 0 and s > self.config.settle_fraction * self.scale_peak[kind]:
                    settled = False
        self.settled = settled

    def _decide(self) -> None:
        """Per-unit equilibrium, then the layer rule, then the masks."""
        cfg = self.config
        decide = self.t >= cfg.warmup + 1 and not self.hold
        self.capped = {}
        for key in self.keys:
            if not decide:
                eq = torch.zeros(self.num_units[key], dtype=torch.bool)
            elif cfg.criterion == "absolute":
                eq = at_equilibrium(self.v[key], cfg.eps)
            elif not self.scale[key[1]] > 0:
                # nothing measurably moved at this check (or no similarity exists): no new information, keep the
                # previous decisions rather than reading "no scale" as "nothing at rest"
                eq = self.equilibrium[key]
            else:
                eq = relative_equilibrium(self.v[key], self.phi[key], self.scale[key[1]], cfg.eps_relative)
                if cfg.eps_relative_max > 0:
                    # the cap on the velocity threshold; the units it alone kept from being at rest are reported per
                    # check as `capped`
                    capped = eq & ~(self.v[key].abs() < cfg.eps_relative_max)
                    self.capped[key] = int(capped.sum())
                    eq = eq & ~capped
                # A frozen unit stays at rest while its output does not move: its velocity right after freezing
                # measures the freeze itself (its own updates stopped), not a change of the unit.
                eq = eq | (self.frozen[key] & still(self.phi[key], self.scale[key[1]], cfg.eps_relative))
            self.equilibrium[key] = eq
        fractions = []
        for layer in self.layers:
            keys = [(layer, kind) for kind in cfg.unit_kinds]
            fractions.append(
                sum(int(self.equilibrium[k].sum()) for k in keys) / max(sum(self.num_units[k] for k in keys), 1)
            )
        previous = self.layers_frozen
        self.layers_frozen = layer_rule(fractions, cfg.layer_threshold) if decide else 0
        if decide and not self.settled:
            # the movement gate (NEqConfig.settle_fraction): nothing new freezes, what is frozen may stay or go
            self.layers_frozen = min(self.layers_frozen, previous)
        for key in self.keys:
            eq = self.equilibrium[key]
            if key[0] < self.layers_frozen:
                eq = torch.ones_like(eq)
            elif self.granularity == "layer":
                eq = torch.zeros_like(eq)
            elif decide and not self.settled:
                eq = eq & self.frozen[key]
            self.frozen[key] = (self.frozen[key] | eq) if cfg.pin_frozen else eq

    @staticmethod
    def _rows_error(rows: int, expected: int) -> ValueError:
        return ValueError(
            f"The NEq held-out pass gave {rows} output rows but the reference outputs have {expected}: the held-out "
            "split (its samples, their token counts with token_pooling='none', or the number of processes) changed "
            "since the reference was recorded. Keep the held-out dataset, collator and process count fixed in a run."
        )

    # -- masks and figures -----------------------------------------------------------------------------------
    def unit_active(self) -> dict[Key, torch.Tensor]:
        return {k: ~f for k, f in self.frozen.items()}

    def _figures(self, nonfinite: int) -> dict:
        kinds = self.config.unit_kinds
        per_layer = {kind: [] for kind in kinds}
        frozen_total = units_total = 0
        for (_, kind), mask in self.frozen.items():
            per_layer[kind].append(int(mask.sum()) / mask.numel())
            frozen_total += int(mask.sum())
            units_total += mask.numel()
        figures = {
            "check": self.t - 1,
            "frozen_fraction": frozen_total / max(units_total, 1),
            "layers_frozen": self.layers_frozen,
            "held": int(self.hold),
            "nonfinite_units": nonfinite,
        }
        for kind in kinds:
            num = sum(int(self.frozen[k].sum()) for k in self.keys if k[1] == kind)
            den = sum(self.num_units[k] for k in self.keys if k[1] == kind)
            figures[f"frozen_fraction/{kind}"] = num / max(den, 1)
            figures[f"per_layer/{kind}"] = per_layer[kind]
            # units at equilibrium by the rule, per layer, before the layer rule and the granularity (what
            # `layer_threshold` is compared with)
            figures[f"per_layer_at_rest/{kind}"] = [
                int(self.equilibrium[k].sum()) / max(self.num_units[k], 1) for k in self.keys if k[1] == kind
            ]
            phis = torch.cat([self.phi[k] for k in self.keys if k[1] == kind])
            finite = phis[torch.isfinite(phis)]
            figures[f"one_minus_phi/{kind}"] = float((1 - finite).mean()) if finite.numel() else None
            scale = self.scale.get(kind, math.nan)
            figures[f"scale/{kind}"] = None if math.isnan(scale) else scale
        if self.config.settle_fraction > 0:
            figures["settled"] = int(self.settled)
        if self.config.criterion == "relative" and self.config.eps_relative_max > 0:
            for kind in kinds:
                den = sum(self.num_units[k] for k in self.keys if k[1] == kind)
                figures[f"capped/{kind}"] = sum(n for k, n in self.capped.items() if k[1] == kind) / max(den, 1)
        return figures

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "t": self.t,
            "keys": [list(k) for k in self.keys],
            "phi": [self.phi[k] for k in self.keys],
            "v": [self.v[k] for k in self.keys],
            "frozen": [self.frozen[k] for k in self.keys],
            "equilibrium": [self.equilibrium[k] for k in self.keys],
            "scale": dict(self.scale),
            "scale_peak": dict(self.scale_peak),
            "settled": self.settled,
            "layers_frozen": self.layers_frozen,
            "loss_start": self.loss_start,
            "gate_step": self.gate_step,
            "reference": [self.reference[k].cpu() for k in self.keys] if self.reference else None,
            "history": self.history,
            "fingerprints": self.fingerprints,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        keys = [tuple(k) for k in state["keys"]]
        if keys != self.keys:
            raise ValueError(
                "The NEq state in this checkpoint tracks different units than this model/config "
                f"({len(keys)} vs {len(self.keys)} unit groups); resume with the same model and NEqConfig.unit_kinds."
            )
        self.t = state["t"]
        self.phi = dict(zip(keys, state["phi"]))
        self.v = dict(zip(keys, state["v"]))
        self.frozen = dict(zip(keys, state["frozen"]))
        # states written before the relative rule and the layer rule existed
        self.equilibrium = dict(zip(keys, state.get("equilibrium", state["frozen"])))
        self.scale = {**self.scale, **state.get("scale", {})}
        self.scale_peak = {**self.scale_peak, **state.get("scale_peak", {})}
        self.settled = state.get("settled", True)
        self.layers_frozen = state.get("layers_frozen", 0)
        self.loss_start, self.gate_step = state.get("loss_start"), state.get("gate_step")
        self.reference = {k: r.to(device) for k, r in zip(keys, state["reference"])} if state["reference"] else {}
        self.history = list(state["history"])

    def reference_bytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.reference.values())
