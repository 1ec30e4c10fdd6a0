"""Where NEq stands against its savings targets, computed from the committed benchmark results (nothing is run).

Reads the GLUE grid (`benchmarks/results/glue`, made by `glue_compare.py`), the longer run
(`benchmarks/results/glue_long`) and the step-time patterns (`benchmarks/results/step_time.json`, made by
`step_time.py`), and writes one row per target: the setting, what was measured, and whether the target is met. A
speed target counts as met only where the accuracy condition beside it holds too.

    python benchmarks/targets.py                  # print the table, write benchmarks/results/targets.md
    python benchmarks/targets.py --readme         # ... and the README block between the targets markers
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import glue_compare  # noqa: E402

ROOT = glue_compare.ROOT
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TITLES = {"sst2": "SST-2", "mrpc": "MRPC"}
PROFILE_NOTE = (
    "each layer's share of the run frozen (its average frozen fraction over the checks) weighs the step cost measured "
    "with the bottom k layers frozen (`step_time.py`, same sequence length, CPU time); the checks add their share; "
    "the prediction is step cost / (1 − checks' share). The measured ratio is to the `full` run of the same seed in the "
    "same folder of `benchmarks/results/`."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--grid_dirs",
        nargs="+",
        default=[os.path.join(RESULTS, "glue"), os.path.join(RESULTS, "glue_rerun")],
        help="results of the GLUE grid (each folder judged on its own: CPU-time ratios only within one folder)",
    )
    p.add_argument(
        "--long_dirs",
        nargs="+",
        default=[os.path.join(RESULTS, "glue_long"), os.path.join(RESULTS, "glue_long_cap")],
        help="results of the longer run (each folder judged on its own)",
    )
    p.add_argument(
        "--step_time",
        nargs="+",
        default=[
            os.path.join(RESULTS, "step_time.json"),
            os.path.join(RESULTS, "step_time_1thread", "step_time.json"),
        ],
        help="results of step_time.py (the README's table, 2 threads; the same with 1 thread, as the GLUE runs)",
    )
    p.add_argument(
        "--profile_step_time",
        default=os.path.join(RESULTS, "step_time_1thread", "step_time.json"),
        help="the step_time.py results whose bottom-k ratios price the profile (same threads as the GLUE runs)",
    )
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--output", default=os.path.join(RESULTS, "targets.md"))
    p.add_argument("--readme", nargs="?", const=os.path.join(ROOT, "README.md"))
    return p.parse_args(argv)


class Grid:
    """Runs of one results folder, compared by task and method over the seeds they share."""

    def __init__(self, folder: str, max_seq_length: int):
        self.name = f"`{os.path.basename(os.path.normpath(folder))}`"
        self.runs = [r for r in glue_compare.load_results(folder) if r.get("max_seq_length") == max_seq_length]

    def of(self, task: str, method: str) -> list[dict]:
        return [r for r in self.runs if r["task"] == task and r["method"] == method]

    def compare(self, task: str, method: str, baseline: str) -> Optional[dict]:
        """CPU-time ratio (means over seeds) and accuracy difference in points (same seeds) of method to baseline."""
        runs, base = self.of(task, method), self.of(task, baseline)
        seeds = {r["seed"] for r in runs} & {r["seed"] for r in base}
        runs = [r for r in runs if r["seed"] in seeds]
        base = [r for r in base if r["seed"] in seeds]
        if not runs or not base:
            return None
        metric = "accuracy" if "accuracy" in runs[0]["metrics"] else next(iter(runs[0]["metrics"]))
        accuracy = statistics.mean(r["metrics"][metric] for r in runs) * 100
        return {
            "cpu": statistics.mean(r["train_cpu_seconds"] for r in runs)
            / statistics.mean(r["train_cpu_seconds"] for r in base),
            "delta": accuracy - statistics.mean(r["metrics"][metric] for r in base) * 100,
            "accuracy": accuracy,
            "seeds": ",".join(str(s) for s in sorted(seeds)),
        }


def _speed_row(target: str, grid: Grid, task: str, method: str, baseline: str, limit: float, tolerance: float):
    c = grid.compare(task, method, baseline)
    if c is None:
        return [target, grid.name, f"`{method}`, {TITLES.get(task, task)}", "not measured", "–"]
    fast, accurate = c["cpu"] <= limit, c["delta"] >= -tolerance
    met = "met" if fast and accurate else "missed (" + " and ".join(
        [w for w, bad in (("time", not fast), ("accuracy", not accurate)) if bad]) + ")"  # fmt: skip
    measured = f"{c['cpu']:.3f}× {baseline}'s CPU time, {c['delta']:+.1f} points (seeds {c['seeds']})"
    return [target, grid.name, f"`{method}`, {TITLES.get(task, task)}", measured, met]


def _dominance_row(grid: Grid, task: str) -> list[str]:
    neq = grid.compare(task, "neq", "full")
    found, beaten = [], []
    for k in (2, 3):
        fixed = grid.compare(task, f"freeze_bottom{k}", "full")
        if neq is None or fixed is None:
            continue
        found.append(f"k={k}: {fixed['cpu']:.3f}×, {fixed['delta']:+.1f}")
        if fixed["cpu"] <= neq["cpu"] and fixed["accuracy"] >= neq["accuracy"]:
            beaten.append(f"k={k}")
    if not found:
        return [
            "`neq` not dominated by `freeze_bottom` k=2 or 3",
            grid.name,
            TITLES.get(task, task),
            "not measured",
            "–",
        ]
    verdict = "met" if not beaten else f"missed (dominated by {' and '.join(beaten)})"
    return [
        "`neq` not dominated by `freeze_bottom` k=2 or 3",
        grid.name,
        f"`neq` vs `freeze_bottom`, {TITLES.get(task, task)}",
        f"neq {neq['cpu']:.3f}×, {neq['delta']:+.1f}; " + "; ".join(found),
        verdict,
    ]


def _step_rows(path: str) -> list[list[str]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = json.load(f)
    rows = []
    for pattern, title, limit in (
        ("a_none", "nothing frozen", 1.03),
        ("b_random50", "50% random rows frozen", 0.90),
        ("c_random90", "90% random rows frozen", 0.78),
    ):
        measured, met = [], True
        for length, patterns in sorted(data["lengths"].items(), key=lambda kv: int(kv[0])):
            if pattern in patterns:
                ratio = patterns[pattern]["time_ratio"]
                measured.append(f"{ratio:.3f} ({length} tokens)")
                met &= ratio <= limit
        if measured:
            threads = data.get("meta", {}).get("threads", "?")
            inside = os.path.abspath(path).startswith(RESULTS + os.sep)
            where = os.path.relpath(os.path.abspath(path), RESULTS) if inside else os.path.basename(path)
            rows.append([f"step time, {title}: ≤ {limit:.2f}×", f"`{where}`", f"NEq's step, {threads} thread" + ("" if threads == 1 else "s"),
                         ", ".join(measured), "met" if met else "missed"])  # fmt: skip
    return rows


def _step_ratios(path: str, seq_len: int) -> dict[int, float]:
    """CPU-time ratio of a step with the bottom k layers (and the embeddings) frozen, by k, from `step_time.py`."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    rows = data["lengths"].get(str(seq_len), {})
    ratios = {0: 1.0}
    for name, row in rows.items():
        if name.startswith("bottom"):
            ratios[int(name[len("bottom") :])] = row["cpu_time_ratio"]
    # (d) bottom half and (e) all units: k = half and all of the layers, as the shape records them
    layers = re.search(r"(\d+) layers", data.get("meta", {}).get("shape", ""))
    if layers:
        n = int(layers.group(1))
        for name, k in (("d_bottom_half", n // 2), ("e_all", n)):
            if name in rows:
                ratios.setdefault(k, rows[name]["cpu_time_ratio"])
    return ratios


def profile_rows(grid: Grid, task: str, method: str, ratios: dict[int, float]) -> list[list[str]]:
    """Per run: how long each bottom layer stayed frozen, the step cost that implies, the checks' share, and the
    CPU-time ratio this predicts next to the one measured. Whole layers freeze from the bottom up, so the share of
    the run with k layers frozen is the average frozen fraction of layer k - 1 (over the checks, evenly spaced)."""
    rows = []
    full = grid.of(task, "full")
    for run in sorted(grid.of(task, method), key=lambda r: r["seed"]):
        summary = run["neq"]["summary"]
        per_layer = summary.get("average_per_layer/neurons")
        if not per_layer or not full:
            continue
        shares = [per_layer[str(i)] if isinstance(per_layer, dict) else per_layer[i] for i in range(len(per_layer))]
        cost, known = 1.0, True
        for k, share in enumerate(shares, start=1):
            if share <= 0:
                continue
            if k not in ratios or (k - 1) not in ratios:
                known = False
                break
            cost -= (ratios[k - 1] - ratios[k]) * share
        checks = summary.get("check_time_fraction", 0.0)
        base = [r for r in full if r["seed"] == run["seed"]] or full
        measured = run["train_cpu_seconds"] / statistics.mean(r["train_cpu_seconds"] for r in base)
        frozen = ", ".join(f"{i}: {s:.0%}" for i, s in enumerate(shares) if s > 0) or "none"
        rows.append([
            grid.name,
            f"`{method}`, {TITLES.get(task, task)}, seed {run['seed']}",
            f"{summary.get('gate_step', '–')} of {run['train_steps']}",
            frozen,
            f"{cost:.2f}" if known else "–",
            f"{checks:.1%}",
            f"{cost / (1 - checks):.2f}×" if known else "–",
            f"{measured:.2f}×",
        ])  # fmt: skip
    return rows


def render(args) -> str:
    grids = [Grid(folder, args.max_seq_length) for folder in args.grid_dirs if os.path.isdir(folder)]
    longs = [Grid(folder, args.max_seq_length) for folder in args.long_dirs if os.path.isdir(folder)]
    rows = []
    for grid in grids:
        for task in args.tasks:
            rows.append(_speed_row("default: ≤ 0.85× full, within 0.5 points", grid, task, "neq", "full", 0.85, 0.5))
    for grid in grids:
        for task in args.tasks:
            rows.append(_dominance_row(grid, task))
    for grid in grids:
        for task in args.tasks:
            rows.append(_speed_row("fastest recommended: ≤ 0.70× full, within 1.0", grid, task, "neq_fast", "full",
                                   0.70, 1.0))  # fmt: skip
    for grid in grids:
        for task in args.tasks:
            rows.append(_speed_row("NEq+LoRA default: ≤ 0.90× LoRA, within 0.5", grid, task, "neq_lora", "lora",
                                   0.90, 0.5))  # fmt: skip
    rows = [row for row in rows if row[3] != "not measured"]
    for path in args.step_time:
        rows += _step_rows(path)
    # the longer run is not a target of its own: it shows whether the grid's picture holds over 500 steps
    for long in longs:
        for method, limit, tolerance, target in (
            ("neq", 0.85, 0.5, "default (500-step run)"),
            ("neq_fast", 0.70, 1.0, "fastest recommended (500-step run)"),
            ("neq_lora", 0.90, 0.5, "NEq+LoRA default (500-step run)"),
        ):
            baseline = "lora" if method == "neq_lora" else "full"
            row = _speed_row(target, long, "sst2", method, baseline, limit, tolerance)
            if row[3] != "not measured":
                rows.append(row)
    header = ["target", "results", "setting", "measured", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    ratios = _step_ratios(args.profile_step_time, args.max_seq_length)
    profile = []
    for folder, tasks in [(grid, args.tasks) for grid in grids] + [(long, ["sst2"]) for long in longs]:
        for task in tasks:
            for method in ("neq", "neq_fast"):
                profile += profile_rows(folder, task, method, ratios)
    if profile and len(ratios) > 1:
        header = ["results", "run", "progress gate opened at step", "layer: share of the run frozen", "step cost (predicted)",
                  "checks' share of the time", "CPU time vs full (predicted)", "CPU time vs full (measured)"]  # fmt: skip
        lines += ["", "Where the time goes: " + PROFILE_NOTE, "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
        lines += ["| " + " | ".join(row) + " |" for row in profile]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    table = render(args)
    command = "python benchmarks/targets.py" + "".join(f" {a}" for a in argv)
    text = f"Generated by `{command}` from the committed results:\n\n{table}"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)
    if args.readme:
        glue_compare.update_readme(args.readme, text, "targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
