"""Does NEq's default criterion hold accuracy in every regime? Runs and tabulates NEq against its baseline.

Regimes (MiniLM on GLUE through `benchmarks/glue_compare.py`, one results folder per regime):

- full fine-tuning on SST-2 and MRPC (seeds 0 and 1) and LoRA (r 8, lr 5e-4) on SST-2 and MRPC: read from the GLUE
  grid (`--grid_dir`, made by `glue_compare.py`);
- SST-2 full fine-tuning at learning rate x0.5 and x2, and at run length x0.5 and x2 (``--seeds``, default 0): run
  here;
- SmolLM2-135M LoRA on the SST-2 slice: read from `benchmarks/results/smollm2_sst2.json` (made by
  `benchmarks/smollm2_sst2.py`).

    python benchmarks/regimes.py                      # run the missing SST-2 variations, then write the table
    python benchmarks/regimes.py --table_only --readme
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import glue_compare  # noqa: E402

ROOT = glue_compare.ROOT
RESULTS = os.path.join(ROOT, "benchmarks", "results")
VARIATIONS = {  # name -> glue_compare arguments (SST-2, seed 0, full vs neq)
    "lr_x0.5": ["--lr_full", "2.5e-5"],
    "lr_x2": ["--lr_full", "1e-4"],
    "length_x0.5": ["--epochs", "1"],
    "length_x2": ["--epochs", "4"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid_dir", default=os.path.join(RESULTS, "glue"), help="results of the GLUE grid")
    p.add_argument("--results_dir", default=os.path.join(RESULTS, "regimes"))
    p.add_argument("--variations", nargs="*", default=list(VARIATIONS), choices=list(VARIATIONS))
    p.add_argument("--seeds", nargs="+", default=["0"], help="seeds of the SST-2 variations")
    p.add_argument(
        "--methods", nargs="+", default=["full", "neq"], help="glue_compare.py methods run for each variation"
    )
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--extra_args", default="", help="passed to glue_compare.py's --extra_args")
    p.add_argument("--smollm2", default=os.path.join(RESULTS, "smollm2_sst2.json"))
    p.add_argument("--table_only", action="store_true")
    p.add_argument("--readme", nargs="?", const=os.path.join(ROOT, "README.md"))
    return p.parse_args(argv)


def _load(folder: str) -> list[dict]:
    return glue_compare.load_results(folder)


def _row(
    name: str, runs: list[dict], baseline: str, method: str, timing: Optional[list[dict]] = None
) -> Optional[list[str]]:
    """One table row: ``method`` against ``baseline`` over the seeds of ``method``; ``timing``: further baseline runs
    (the same seeds, made on the method's occasion) used only to pair CPU times."""
    base = [r for r in runs if r["method"] == baseline]
    neq = [r for r in runs if r["method"] == method]
    if not base or not neq:
        return None
    # the baseline over the same seeds as the method, where it has them
    base = [r for r in base if r["seed"] in {m["seed"] for m in neq}] or base
    metric = next(iter(base[0]["metrics"]))
    b = statistics.mean(r["metrics"][metric] for r in base) * 100
    n = statistics.mean(r["metrics"][metric] for r in neq) * 100
    if all("neq" in r for r in neq):
        summaries = [r["neq"]["summary"] for r in neq]
        final = statistics.mean(s.get("final_frozen_fraction", 0.0) for s in summaries)
        average = statistics.mean(s.get("average_frozen_fraction", 0.0) for s in summaries)
        frozen = f"{final:.0%} / {average:.0%}"
    else:
        frozen = "bottom layers, from step 0"
    # CPU time only between runs of one occasion: the machine's speed moved by up to 2x between occasions (results
    # installed from a later occasion carry an "occasion" field; the earlier ones none)
    timed = base + [r for r in timing or [] if r["method"] == baseline]
    paired = [(r, b) for r in neq for b in timed if b["seed"] == r["seed"] and r.get("occasion") == b.get("occasion")]
    if not paired:
        paired = list(zip(neq, base))
    cpu = statistics.mean(r["train_cpu_seconds"] for r, _ in paired) / statistics.mean(
        b["train_cpu_seconds"] for _, b in paired
    )
    seeds = ",".join(str(r["seed"]) for r in sorted(neq, key=lambda r: r["seed"]))
    cpu_text = f"{cpu:.2f}×"
    if len(paired) < len(neq):
        cpu_text += " (seeds " + ",".join(str(r["seed"]) for r, _ in sorted(paired, key=lambda p: p[0]["seed"])) + ")"
    if method.startswith("neq") and method != "neq_control" and all("neq" in r for r in neq):
        # runs made before NEqConfig.min_loss_drop existed had no progress gate
        if not any(r["neq"]["config"].get("min_loss_drop") for r in neq):
            method += " (no gate)"
        # runs made before the cap on the relative rule's |v| (NEqConfig.eps_relative_max) existed
        configs = [r["neq"]["config"] for r in neq]
        if all(c.get("criterion") == "relative" and not c.get("eps_relative_max") for c in configs):
            method += " (no velocity cap)"
    return [name, f"{baseline} → {method}", seeds, f"{metric} {b:.1f} → {n:.1f}", f"{n - b:+.1f}",
            frozen, cpu_text]  # fmt: skip


def render(args) -> str:
    header = ["regime", "baseline → method", "seeds", "dev metric (×100)", "Δ", "frozen final / average",
              "CPU time ratio"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    grid = _load(args.grid_dir)
    for task, title in (("sst2", "SST-2"), ("mrpc", "MRPC")):
        runs = [r for r in grid if r["task"] == task and r.get("max_seq_length") == args.max_seq_length]
        pairs = (("full", "neq", "full fine-tuning"), ("full", "neq_cache", "full fine-tuning"),
                 ("full", "neq_unit", "full fine-tuning"), ("lora", "neq_lora", "LoRA r 8"))  # fmt: skip
        for baseline, method, label in pairs:
            row = _row(f"MiniLM {title}, {label}", runs, baseline, method)
            if row:
                lines.append("| " + " | ".join(row) + " |")
    for name in VARIATIONS:
        folder = os.path.join(args.results_dir, name)
        runs = _load(folder)
        # full fine-tuning runs made beside later NEq runs, for their CPU time only (their accuracy is that of the
        # same seed's run in `folder`: it is deterministic per seed here)
        timing = _load(os.path.join(folder, "full_beside"))
        # where present: neq_unit (the default's decisions with units frozen one by one as well: the default of the
        # previous version), neq_heldout (the default with the probes removed from training), neq_fast (the fastest
        # recommended setting), neq_control (the held-out probes removed from training, the checks, nothing frozen:
        # the spread that is not freezing's), freeze_bottom2 (what a fixed freeze costs there) and neq_cache (the
        # default with the frozen-prefix cache)
        title = f"MiniLM SST-2, full, {name.replace('_x', ' ×')}"
        for method in ("neq", "neq_cache", "neq_unit", "neq_heldout", "neq_fast", "neq_control", "freeze_bottom2"):
            row = _row(title, runs, "full", method, timing)
            if row:
                lines.append("| " + " | ".join(row) + " |")
            if method == "neq":
                # the default as it was before the cap on |v| (NEqConfig.eps_relative_max), where it decided otherwise
                no_cap = [r for r in _load(os.path.join(folder, "no_cap")) if r["method"] == "neq"]
                row = _row(title, [r for r in runs if r["method"] == "full"] + no_cap, "full", "neq", timing)
                if row and no_cap:
                    lines.append("| " + " | ".join(row) + " |")
    if os.path.isfile(args.smollm2):
        with open(args.smollm2) as f:
            sm = json.load(f)
        runs = {r["run"]: r for r in sm.get("runs", [])}
        # only a run of NEq's default rule counts (older files hold the paper's absolute rule)
        neq_config = (runs.get("neq_lora") or {}).get("neq_config") or {}
        if "lora" in runs and neq_config.get("criterion") == "relative":
            base, neq = runs["lora"], runs["neq_lora"]
            s = neq.get("neq", {})
            lines.append(
                "| " + " | ".join([
                    "SmolLM2-135M SST-2, LoRA r 8",
                    "lora → neq_lora" + ("" if neq_config.get("min_loss_drop") else " (no gate)")
                    + ("" if neq_config.get("granularity") == "layer" else " (units one by one)"), str(sm.get("settings", {}).get("seed", 0)),
                    f"accuracy {base['dev_accuracy'] * 100:.1f} → {neq['dev_accuracy'] * 100:.1f}",
                    f"{(neq['dev_accuracy'] - base['dev_accuracy']) * 100:+.1f}",
                    f"{s.get('final_frozen_fraction', 0):.0%} / {s.get('average_frozen_fraction', 0):.0%}",
                    f"{neq['train_cpu_seconds'] / base['train_cpu_seconds']:.2f}×",
                ]) + " |"
            )  # fmt: skip
    # reruns with the cap on |v| of runs made before it existed: the grid's (`grid_cap/`) and the variations'
    # (`<variation>/cap_check/`)
    checks = [("the GLUE grid", grid, _load(os.path.join(args.results_dir, "grid_cap")))]
    for name in VARIATIONS:
        folder = os.path.join(args.results_dir, name)
        title = f"SST-2 at {name.replace('_x', ' ×')}"
        checks.append((title, _load(folder), _load(os.path.join(folder, "cap_check"))))
    text = "\n".join(lines) + "\n" + "".join(_cap_check(*check) for check in checks)
    return text + _smollm2_cap_check(
        args.smollm2, os.path.join(args.results_dir, "smollm2_cap_check", "smollm2_sst2.json")
    )


def _smollm2_cap_check(path: str, rerun_path: str) -> str:
    """The SmolLM2 run again with the cap on |v|: the same accuracy and frozen fractions as the row above?"""
    if not (os.path.isfile(path) and os.path.isfile(rerun_path)):
        return ""
    with open(path) as f, open(rerun_path) as g:
        old, new = ({r["run"]: r for r in json.load(h)["runs"]} for h in (f, g))
    if "neq_lora" not in old or "neq_lora" not in new:
        return ""
    cap = new["neq_lora"].get("neq_config", {}).get("eps_relative_max", 0.0)
    keys = ("final_frozen_fraction", "average_frozen_fraction")
    same = all(old[k]["dev_accuracy"] == new[k]["dev_accuracy"] for k in ("lora", "neq_lora")) and all(
        old["neq_lora"].get("neq", {}).get(k) == new["neq_lora"].get("neq", {}).get(k) for k in keys
    )
    a, b = old["neq_lora"], new["neq_lora"]
    verdict = (
        "the same accuracy and frozen fractions"
        if same
        else f"accuracy {a['dev_accuracy'] * 100:.1f} → {b['dev_accuracy'] * 100:.1f}, average frozen "
        f"{a.get('neq', {}).get('average_frozen_fraction', 0):.0%} → {b.get('neq', {}).get('average_frozen_fraction', 0):.0%}"
    )
    return f"\nThe SmolLM2 run again with the cap on |v| (eps_relative_max {cap:g}): {verdict}.\n"


_DECISIONS = ("final_frozen_fraction", "average_frozen_fraction", "gate_step", "average_per_layer/heads",
              "average_per_layer/neurons")  # fmt: skip


def _cap_check(title: str, runs: list[dict], reruns: list[dict]) -> str:
    """Whether reruns with the cap on |v| (NEqConfig.eps_relative_max) of runs made before it took their decisions:
    the same metrics, frozen fractions (final, average, per layer) and gate step."""
    if not reruns:
        return ""
    by_key = {(r["task"], r["method"], r["seed"]): r for r in runs}
    same, differ = [], []
    for r in sorted(reruns, key=lambda r: (r["task"], r["method"], r["seed"])):
        old = by_key.get((r["task"], r["method"], r["seed"]))
        if old is None or "neq" not in r:
            continue
        name = f"{r['task']} {r['method']} seed {r['seed']}"
        a, b = r["neq"]["summary"], old["neq"]["summary"]
        if r["metrics"] == old["metrics"] and all(a.get(k) == b.get(k) for k in _DECISIONS):
            same.append(name)
        else:
            metric = next(iter(r["metrics"]))
            differ.append(
                f"{name} ({metric} {old['metrics'][metric] * 100:.1f} → {r['metrics'][metric] * 100:.1f}, average "
                f"frozen {b['average_frozen_fraction']:.0%} → {a['average_frozen_fraction']:.0%})"
            )
    caps = sorted({r["neq"]["config"].get("eps_relative_max", 0.0) for r in reruns if "neq" in r})
    text = f"\nNEq runs of {title} again with the cap on |v| (eps_relative_max {', '.join(f'{c:g}' for c in caps)}):"
    if same:
        text += f" the same metrics, frozen fractions (final, average, per layer) and gate step: {', '.join(same)}."
    if differ:
        text += f" Other decisions: {'; '.join(differ)}."
    return text + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not args.table_only:
        for name in args.variations:
            glue_compare.main(
                ["--tasks", "sst2", "--seeds", *args.seeds, "--methods", *args.methods,
                 "--max_seq_length", str(args.max_seq_length), "--results_dir", os.path.join(args.results_dir, name),
                 "--table", os.path.join(args.results_dir, f"{name}.md"), "--extra_args", args.extra_args]
                + VARIATIONS[name]
            )  # fmt: skip
    table = render(args)
    command = "python benchmarks/regimes.py" + "".join(f" {a}" for a in argv)
    text = f"Generated by `{command}`:\n\n{table}"
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "regimes.md"), "w") as f:
        f.write(text)
    print(text)
    if args.readme:
        glue_compare.update_readme(args.readme, text, "regimes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
