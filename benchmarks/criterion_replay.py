"""Replay NEq's equilibrium rules on recordings made by `benchmarks/criterion_probe.py`.

For each regime (a recording of every unit's held-out outputs through a run where nothing froze), compute phi, the
velocity and the decisions of the absolute rule (|v| < eps) and of the relative rule (eps_relative) at several
thresholds, with checks every `--stride` probe points, plus the layer rule at several tau. Reports, per setting, the
average and final frozen fraction and the average number of bottom layers frozen whole. A replay has no feedback
(frozen units kept training in the recording), so it estimates when units settle; the GLUE runs measure the rest.

    python benchmarks/criterion_replay.py /tmp/neq_probe/*.pt --out benchmarks/results/criterion_replay
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from neq_hf.equilibrium import (
    at_equilibrium,
    cosine_from_sums,
    layer_rule,
    relative_equilibrium,
    relative_scale,
    velocity,
)


def similarities(outputs: list[dict], stride: int) -> tuple[list[dict], list[int]]:
    """phi per unit between probe points i and i + stride (checks every `stride` probes)."""
    idx = list(range(0, len(outputs), stride))
    phis = []
    for a, b in zip(idx, idx[1:]):
        phi = {}
        for key, cur in outputs[b].items():
            prev = outputs[a][key]
            n = cur.shape[1] if key[1] == "neurons" else cur.shape[1] // 32  # MiniLM head_dim 32
            c, p = cur.reshape(cur.shape[0], n, -1), prev.reshape(prev.shape[0], n, -1)
            phi[key] = cosine_from_sums((c * p).sum((0, 2)), (p * p).sum((0, 2)), (c * c).sum((0, 2)))
        phis.append(phi)
    return phis, idx


# Step-time ratio to full fine-tuning with the embeddings and the bottom k layers of MiniLM-L6 frozen whole (batch 32,
# 64 tokens, CPU; measured with interleaved medians): what a run spends per step while k layers are frozen.
STEP_RATIO_BOTTOM_K = [1.0, 0.81, 0.73, 0.69, 0.58, 0.48, 0.39]


def replay(phis: list[dict], rule: str, threshold: float, tau: float, mu: float = 0.5) -> dict:
    keys = list(phis[0])
    kinds = sorted({k[1] for k in keys})
    layers = sorted({k[0] for k in keys})
    prev_phi = {k: torch.full_like(phis[0][k], float("nan")) for k in keys}
    v = {k: torch.full_like(phis[0][k], float("nan")) for k in keys}
    scale = {}
    frozen_fraction, layers_frozen = [], []
    for t, phi in enumerate(phis, start=1):
        eq = {}
        for k in keys:
            v[k] = velocity(phi[k], prev_phi[k], v[k], mu)
            prev_phi[k] = phi[k]
        for kind in kinds:
            scale[kind] = relative_scale([phi[k] for k in keys if k[1] == kind])
        for k in keys:
            if t < 2:
                eq[k] = torch.zeros_like(phi[k], dtype=torch.bool)
            elif rule == "absolute":
                eq[k] = at_equilibrium(v[k], threshold)
            else:
                eq[k] = relative_equilibrium(v[k], phi[k], scale[k[1]], threshold)
        fr = [
            sum(int(eq[(layer, kind)].sum()) for kind in kinds) / sum(eq[(layer, kind)].numel() for kind in kinds)
            for layer in layers
        ]
        whole = layer_rule(fr, tau) if t >= 2 else 0
        total = sum(m.numel() for m in eq.values())
        frozen = sum(m.numel() if k[0] < whole else int(m.sum()) for k, m in eq.items())
        frozen_fraction.append(frozen / total)
        layers_frozen.append(whole)
    # layers_frozen[t] holds from check t to check t + 1; before the first decision nothing is frozen whole
    spans = [0] + layers_frozen[:-1]
    estimate = sum(STEP_RATIO_BOTTOM_K[min(k, len(STEP_RATIO_BOTTOM_K) - 1)] for k in spans) / len(spans)
    return {
        "estimated_step_ratio": estimate,
        "frozen_fraction": frozen_fraction,
        "layers_frozen": layers_frozen,
        "average_frozen": sum(frozen_fraction) / len(frozen_fraction),
        "final_frozen": frozen_fraction[-1],
        "average_layers_frozen": sum(layers_frozen) / len(layers_frozen),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recordings", nargs="+")
    p.add_argument("--stride", type=int, default=2, help="probe points per check (20 probes / 2 = 10 checks)")
    p.add_argument("--out", default="benchmarks/results/criterion_replay")
    a = p.parse_args()
    settings = [("absolute", e, 1.0) for e in (1e-4, 1e-3, 1e-2)]
    settings += [("relative", e, tau) for e in (0.01, 0.02, 0.05, 0.1, 0.2) for tau in (1.0, 0.9, 0.75, 0.5)]
    results = {}
    for path in a.recordings:
        rec = torch.load(path, weights_only=False)
        name = os.path.splitext(os.path.basename(path))[0]
        phis, idx = similarities(rec["outputs"], a.stride)
        one_minus = [float(torch.cat([1 - v for v in phi.values()]).median()) for phi in phis]
        results[name] = {"steps": [rec["steps"][i] for i in idx], "median_one_minus_phi": one_minus, "settings": {}}
        for rule, thr, tau in settings:
            results[name]["settings"][f"{rule} {thr:g} tau {tau:g}"] = replay(phis, rule, thr, tau)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| setting | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for rule, thr, tau in settings:
        key = f"{rule} {thr:g} tau {tau:g}"
        cells = []
        for name in results:
            r = results[name]["settings"][key]
            cells.append(
                f"{r['average_frozen']:.2f} / {r['final_frozen']:.2f} / {r['average_layers_frozen']:.1f} / "
                f"{r['estimated_step_ratio']:.2f}"
            )
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    text = (
        "Replay: frozen fraction average / final / average bottom layers frozen whole / step-time ratio estimated "
        "from the layers frozen whole (no check cost):\n\n"
    )
    text = text + "\n".join(lines) + "\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax_abs) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        thresholds = (0.01, 0.02, 0.05, 0.1, 0.2)
        for name in results:
            for tau, style in ((0.5, "--"), (0.9, "-"), (1.0, ":")):
                ys = [results[name]["settings"][f"relative {t:g} tau {tau:g}"]["average_frozen"] for t in thresholds]
                ax.plot(thresholds, ys, style, marker="o", label=f"{name}, layer_threshold {tau:g}")
            eps = (1e-4, 1e-3, 1e-2)
            ys = [results[name]["settings"][f"absolute {e:g} tau 1"]["average_frozen"] for e in eps]
            ax_abs.plot(eps, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("eps_relative (relative rule)")
        ax.set_ylabel("average frozen fraction over checks (replay)")
        ax.legend(fontsize=8)
        ax_abs.set_xscale("log")
        ax_abs.set_xlabel("eps (the paper's absolute rule, per unit)")
        ax_abs.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out + ".png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
