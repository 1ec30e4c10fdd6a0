"""State of NEq over checks: reference outputs, similarity, velocity, masks and history."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

from .config import NEqConfig
from .equilibrium import at_equilibrium, cosine_from_sums, velocity
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
        self.phi = {k: torch.full((n,), math.nan) for k, n in self.num_units.items()}
        self.v = {k: torch.full((n,), math.nan) for k, n in self.num_units.items()}
        self.frozen = {k: torch.zeros(n, dtype=torch.bool) for k, n in self.num_units.items()}
        self.history: list[dict] = []

    # -- one check -------------------------------------------------------------------------------------------
    def check(self, run_pass: Callable[[Callable], None], all_reduce: Optional[Callable] = None) -> dict:
        """Run one held-out pass (``run_pass(on_batch)``) and update the state; returns this check's figures."""
        sums = {k: torch.zeros(3, n, dtype=torch.float64) for k, n in self.num_units.items()}
        chunks: dict[Key, list[torch.Tensor]] = {k: [] for k in self.keys}
        first = self.t == 0

        def on_batch(start: int, pooled: dict[Key, torch.Tensor]) -> None:
            for key in self.keys:
                cur = pooled[key]
                if first:
                    chunks[key].append(cur)
                    continue
                ref = self.reference[key]
                prev = ref[start : start + cur.shape[0]]
                n = self.num_units[key]
                c, p = cur.reshape(cur.shape[0], n, -1), prev.reshape(prev.shape[0], n, -1)
                s = torch.stack([(c * p).sum((0, 2)), (p * p).sum((0, 2)), (c * c).sum((0, 2))])
                sums[key] += s.double().cpu()
                ref[start : start + cur.shape[0]] = cur

        run_pass(on_batch)
        if first:
            self.reference = {k: torch.cat(v) for k, v in chunks.items()}
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
            v = velocity(phi, self.phi[key], self.v[key], self.config.mu).float()
            decide = self.t >= self.config.warmup + 1
            eq = at_equilibrium(v, self.config.eps) if decide else torch.zeros(n, dtype=torch.bool)
            nonfinite += int((~torch.isfinite(phi)).sum())
            self.frozen[key] = (self.frozen[key] | eq) if self.config.pin_frozen else eq
            self.phi[key], self.v[key] = phi, v
        self.t += 1
        return self._figures(nonfinite=nonfinite)

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
            "nonfinite_units": nonfinite,
        }
        for kind in kinds:
            num = sum(int(self.frozen[k].sum()) for k in self.keys if k[1] == kind)
            den = sum(self.num_units[k] for k in self.keys if k[1] == kind)
            figures[f"frozen_fraction/{kind}"] = num / max(den, 1)
            figures[f"per_layer/{kind}"] = per_layer[kind]
            phis = torch.cat([self.phi[k] for k in self.keys if k[1] == kind])
            finite = phis[torch.isfinite(phis)]
            figures[f"one_minus_phi/{kind}"] = float((1 - finite).mean()) if finite.numel() else None
        return figures

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "t": self.t,
            "keys": [list(k) for k in self.keys],
            "phi": [self.phi[k] for k in self.keys],
            "v": [self.v[k] for k in self.keys],
            "frozen": [self.frozen[k] for k in self.keys],
            "reference": [self.reference[k].cpu() for k in self.keys] if self.reference else None,
            "history": self.history,
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
        self.reference = {k: r.to(device) for k, r in zip(keys, state["reference"])} if state["reference"] else {}
        self.history = list(state["history"])

    def reference_bytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.reference.values())
