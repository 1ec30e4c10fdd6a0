"""Compare full fine-tuning, NEq, LoRA and NEq + LoRA on GLUE with `examples/glue.py`, and tabulate the results.

Every run is `examples/glue.py` in a subprocess of its own (clean memory and timing) and leaves
`<results_dir>/<task>_<method>_seed<k>.json`; runs whose file exists are skipped, so an interrupted grid resumes where
it stopped. The Markdown table (`benchmarks/results/glue.md`) is generated from those files only.

    python benchmarks/glue_compare.py                          # the whole grid: hours on a CPU
    python benchmarks/glue_compare.py --tasks rte --methods full neq --seeds 0
    python benchmarks/glue_compare.py --table_only --readme    # regenerate the table and the README block

Same seed, epochs, batch size and sequence length for every method; the learning rate is per method (LoRA needs a
larger one). The ratio of backward FLOPs is measured by `benchmarks/step_time.py`, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "glue.py")
# Baselines first: later runs record their time ratio to them. freeze_bottom<K>: a plain Trainer with the embeddings
# and the bottom K layers frozen from step 0 (glue.py --method freeze_bottom --freeze_bottom_layers K).
METHODS = (
    "full",
    "neq",
    "neq_fast",
    "neq_unit",
    "neq_cache",
    "neq_control",
    "neq_heldout",
    "freeze_bottom2",
    "lora",
    "neq_lora",
    "freeze_bottom3",
    "neq_paper",
)
TABLE_ORDER = (
    "full",
    "neq_paper",
    "neq",
    "neq_heldout",
    "neq_fast",
    "neq_unit",
    "neq_cache",
    "neq_control",
    "freeze_bottom2",
    "freeze_bottom3",
    "lora",
    "neq_lora",
)
# NEq settings compared with the default (`--method neq` with these NEqConfig flags); their results carry the name.
NEQ_VARIANTS = {
    # the paper's rule: |v| < 1e-3, per-unit freezing, 10 checks per run (the grid's runs have ~122 steps)
    "neq_paper": [
        "--criterion",
        "absolute",
        "--eps",
        "1e-3",
        "--layer_threshold",
        "1.0",
        "--check_every",
        "12",
        "--min_loss_drop",
        "0",
        "--granularity",
        "unit",
    ],  # fmt: skip
    # the fastest setting recommended: whole layers freeze once half of their units are at rest, and the frozen-prefix
    # cache
    "neq_fast": ["--layer_threshold", "0.5", "--cache_frozen_prefix", "true"],
    # the default with the frozen-prefix cache
    "neq_cache": ["--cache_frozen_prefix", "true"],
    # the default's decisions, units at equilibrium frozen as well as whole layers (the default before whole layers
    # only)
    "neq_unit": ["--granularity", "unit"],
    # a control: NEq's data pipeline with the held-out split carved out of training, the checks, and nothing ever at
    # rest, so nothing freezes: what removing the probes from training costs (with them kept in training, the
    # default, such a run is the full run bit for bit: tests/test_trainer.py)
    "neq_control": ["--eps_relative", "0", "--holdout_in_train", "false"],
    # the default with the held-out probes removed from training (the default before holdout_in_train): other
    # training data and another batch order than the full run's
    "neq_heldout": ["--holdout_in_train", "false"],
}
BASELINE = {
    "neq": "full",
    "neq_lora": "lora",
    "freeze_bottom2": "full",
    "freeze_bottom3": "full",
    "neq_paper": "full",
    "neq_fast": "full",
    "neq_unit": "full",
    "neq_cache": "full",
    "neq_control": "full",
    "neq_heldout": "full",
}
FREEZE_BOTTOM = "freeze_bottom"
TASKS = ("sst2", "mrpc", "rte")
DEFAULT_SEEDS = {"sst2": [0], "mrpc": [0, 1], "rte": [0, 1]}
DEFAULT_TRAIN_CAPS = {"sst2": 2000, "mrpc": 2000, "rte": 2000}
TASK_TITLES = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "qnli": "QNLI", "cola": "CoLA", "stsb": "STS-B"}
METRIC_TITLES = {
    "accuracy": "acc",
    "f1": "F1",
    "matthews_correlation": "MCC",
    "pearson": "Pearson",
    "spearmanr": "Spearman",
}
SOURCES = {"glue_dir": "the original GLUE TSV files (--glue_dir)", "hub": "nyu-mll/glue from the Hub"}
README_BLOCK = "glue-results"
README_START, README_END = f"<!-- {README_BLOCK}:start -->", f"<!-- {README_BLOCK}:end -->"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help="GLUE tasks (folders of --glue_dir).")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="Methods to run; freeze_bottom2/3 freeze the embeddings and the bottom 2/3 layers from step 0.",
    )
    p.add_argument("--seeds", nargs="+", type=int, help="Seeds for every task (default: SST-2 0; MRPC, RTE 0 1).")
    p.add_argument("--model", default="minilm", help="--model_name_or_path of glue.py (default: packaged MiniLM).")
    p.add_argument(
        "--glue_dir",
        default=os.path.join(os.path.dirname(ROOT), "shared", "data", "glue"),
        help="Folder of GLUE TSV files (default: ../shared/data/glue); '' loads nyu-mll/glue from the Hub instead.",
    )
    p.add_argument(
        "--max_train_samples", type=int, help="Training cap for every task (default: 2000 training samples per task)."
    )
    p.add_argument("--max_eval_samples", type=int, help="Validation cap (default: the whole dev set).")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--lr_full", type=float, default=5e-5, help="Learning rate of full, neq and freeze_bottom2/3.")
    p.add_argument("--lr_lora", type=float, default=5e-4, help="Learning rate of lora and neq_lora.")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--eps", type=float, help="NEq eps of the absolute rule (default: NEqConfig's).")
    p.add_argument(
        "--check_every",
        help="NEq held-out check interval ('auto', 'epoch' or a number of steps; default: NEqConfig's).",
    )
    p.add_argument(
        "--holdout_size", type=float, help="NEq held-out split (samples or fraction; default: NEqConfig's)."
    )
    p.add_argument("--extra_args", default="", help="More glue.py arguments for every run, as one quoted string.")
    p.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results", "glue"))
    p.add_argument("--table", default=os.path.join(ROOT, "benchmarks", "results", "glue.md"))
    p.add_argument(
        "--runs_dir",
        default=os.path.join(tempfile.gettempdir(), "neq_hf_glue_runs"),
        help="Output dirs and logs of the runs (model cards, heatmaps); only the results JSON is kept in results_dir.",
    )
    p.add_argument("--table_only", action="store_true", help="Only regenerate the table from existing results.")
    p.add_argument(
        "--readme",
        nargs="?",
        const=os.path.join(ROOT, "README.md"),
        help=f"Also replace the block between {README_START} and {README_END} in this README (default: the repo's).",
    )
    p.add_argument(
        "--readme_block",
        default=README_BLOCK,
        help="Name of the README block --readme replaces (<!-- NAME:start --> ... <!-- NAME:end -->); e.g. glue-long.",
    )
    p.add_argument("--dry_run", action="store_true", help="Print the commands of the missing runs, run nothing.")
    return p.parse_args(argv)


# -- running --------------------------------------------------------------------------------------------------------
def result_path(results_dir: str, task: str, method: str, seed: int) -> str:
    return os.path.join(results_dir, f"{task}_{method}_seed{seed}.json")


def learning_rate(args: argparse.Namespace, method: str) -> float:
    return args.lr_lora if "lora" in method else args.lr_full


def run_command(args: argparse.Namespace, task: str, method: str, seed: int, output_dir: str) -> list[str]:
    """The glue.py command line of one run."""
    cmd = [
        sys.executable, EXAMPLE,
        "--model_name_or_path", args.model,
        "--task_name", task,
        *glue_method_args(method),
        "--output_dir", output_dir,
        "--seed", str(seed),
        "--learning_rate", str(learning_rate(args, method)),
        "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", str(args.eval_batch_size),
        "--max_seq_length", str(args.max_seq_length),
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--save_model", "false",
        "--report_to", "none",
        "--logging_steps", "25",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    if args.glue_dir:
        cmd += ["--glue_dir", args.glue_dir]
    cap = args.max_train_samples if args.max_train_samples is not None else DEFAULT_TRAIN_CAPS.get(task)
    if cap is not None:
        cmd += ["--max_train_samples", str(cap)]
    if args.max_eval_samples is not None:
        cmd += ["--max_eval_samples", str(args.max_eval_samples)]
    if "lora" in method:
        cmd += ["--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha)]
    if method.startswith("neq"):
        for flag in ("eps", "check_every", "holdout_size"):  # only what was asked for: NEqConfig's defaults otherwise
            if getattr(args, flag) is not None and flag not in " ".join(NEQ_VARIANTS.get(method, [])):
                cmd += [f"--{flag}", f"{getattr(args, flag):g}" if flag != "check_every" else getattr(args, flag)]
    if method in BASELINE:
        baseline = result_path(args.results_dir, task, BASELINE[method], seed)
        if os.path.isfile(baseline):
            cmd += ["--baseline_results", baseline]
    return cmd + shlex.split(args.extra_args)


def glue_method_args(method: str) -> list[str]:
    """glue.py's method flags: ``freeze_bottom3`` is ``--method freeze_bottom --freeze_bottom_layers 3``."""
    if method in NEQ_VARIANTS:
        return ["--method", "neq", *NEQ_VARIANTS[method]]
    if method.startswith(FREEZE_BOTTOM):
        return ["--method", FREEZE_BOTTOM, "--freeze_bottom_layers", method[len(FREEZE_BOTTOM) :]]
    return ["--method", method]


def harness_command(argv: list[str]) -> str:
    return "python benchmarks/glue_compare.py" + "".join(f" {shlex.quote(a)}" for a in argv)


def run_grid(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Run the missing runs; returns the names of those that failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if args.glue_dir and not os.path.isdir(args.glue_dir):
        raise FileNotFoundError(
            f"--glue_dir {args.glue_dir} does not exist: point it at the GLUE TSV files, or pass --glue_dir '' to "
            "load nyu-mll/glue from the Hub."
        )
    os.makedirs(args.results_dir, exist_ok=True)
    os.makedirs(args.runs_dir, exist_ok=True)
    failed = []
    for task in args.tasks:
        for seed in args.seeds if args.seeds is not None else DEFAULT_SEEDS.get(task, [0]):
            for method in (m for m in METHODS if m in args.methods):
                name = f"{task}_{method}_seed{seed}"
                target = result_path(args.results_dir, task, method, seed)
                if os.path.isfile(target):
                    print(f"[skip] {name}: {os.path.relpath(target, ROOT)} exists")
                    continue
                output_dir = os.path.join(args.runs_dir, name)
                cmd = run_command(args, task, method, seed, output_dir)
                if args.dry_run:
                    print(shlex.join(cmd))
                    continue
                shutil.rmtree(output_dir, ignore_errors=True)
                log_path = os.path.join(args.runs_dir, f"{name}.log")
                print(f"[run ] {name} (log: {log_path})", flush=True)
                start = time.perf_counter()
                with open(log_path, "w") as log:
                    code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                elapsed = time.perf_counter() - start
                produced = os.path.join(output_dir, "results.json")
                if code != 0 or not os.path.isfile(produced):
                    with open(log_path) as log:
                        tail = log.read()[-3000:]
                    print(f"[FAIL] {name} (exit code {code}, {elapsed:.0f} s); end of its log:\n{tail}", flush=True)
                    failed.append(name)
                    continue
                with open(produced) as f:
                    result = json.load(f)
                result["method"] = method  # the harness's name (an NEq variant runs glue.py's --method neq)
                result["harness"] = {"command": harness_command(argv), "run_seconds": elapsed}
                with open(target + ".tmp", "w") as f:
                    json.dump(result, f, indent=2)
                os.replace(target + ".tmp", target)  # a half-written file would be skipped as done on resume
                metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
                print(
                    f"[done] {name}: {metrics}; train {result['train_runtime']:.1f} s; run {elapsed:.0f} s", flush=True
                )
    return failed


# -- table ----------------------------------------------------------------------------------------------------------
def load_results(results_dir: str) -> list[dict]:
    results = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                results.append(json.load(f))
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    text = f"{_mean(values) * scale:.{digits}f}"
    # ± is the sample standard deviation over seeds; one seed has none.
    return text + (f" ± {statistics.stdev(values) * scale:.{digits}f}" if len(values) > 1 else "")


def _every(configured, resolved) -> str:
    if "epoch" in (configured, resolved):
        return "epoch"
    steps = resolved if isinstance(resolved, int) else configured
    return f"{steps} steps" + (" (auto: 5% of the run)" if configured == "auto" else "")


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _ratio(runs: list[dict], baseline: list[dict], key: str = "train_runtime") -> Optional[float]:
    if not runs or not baseline or any(key not in r for r in runs + baseline):
        return None
    return _mean([r[key] for r in runs]) / _mean([r[key] for r in baseline])


def _unique(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def render_table(results: list[dict], results_dir: str = "benchmarks/results/glue") -> str:
    """The Markdown table and the text block saying how the numbers were made."""
    if not results:
        return "No GLUE results yet: run `python benchmarks/glue_compare.py`.\n"
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["task"], r["method"])].append(r)
    tasks = _unique([t for t in TASKS if any(k[0] == t for k in groups)] + sorted({k[0] for k in groups}))
    header = [
        "task", "method", "lr", "seeds", "dev metric (×100)", "train time (s)", "time ratio", "CPU time ratio",
        "step (s)",
        "trainable params", "peak memory (MB)", "final frozen",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        ordered = [m for m in TABLE_ORDER if (task, m) in groups]
        for method in ordered + sorted(m for t, m in groups if t == task and m not in ordered):
            runs = sorted(groups[(task, method)], key=lambda r: r["seed"])
            metrics = " / ".join(
                f"{METRIC_TITLES.get(name, name)} {_spread([r['metrics'][name] for r in runs], 100)}"
                for name in runs[0]["metrics"]
            )
            ratio = _ratio(runs, groups.get((task, "full"), []))
            ratio_text = "1.00× full" if method == "full" else (f"{ratio:.2f}× full" if ratio is not None else "–")
            if method == "neq_lora" and _ratio(runs, groups.get((task, "lora"), [])) is not None:
                ratio_text += f", {_ratio(runs, groups[(task, 'lora')]):.2f}× lora"
            cpu = _ratio(runs, groups.get((task, "full"), []), "train_cpu_seconds")
            cpu_text = "1.00× full" if method == "full" else (f"{cpu:.2f}× full" if cpu is not None else "–")
            cpu_lora = _ratio(runs, groups.get((task, "lora"), []), "train_cpu_seconds")
            if method == "neq_lora" and cpu_lora is not None:
                cpu_text += f", {cpu_lora:.2f}× lora"
            steps = [r["mean_step_seconds"] for r in runs if r.get("mean_step_seconds") is not None]
            params = _count(_mean([r["trainable_parameters"] for r in runs]))
            frozen = "–"
            if "neq" in runs[0]:
                params += f" → {_count(_mean([r['neq']['final_trainable_parameters'] for r in runs]))}"
                summaries = [r["neq"]["summary"] for r in runs if "final_frozen_fraction" in r["neq"]["summary"]]
                if summaries:
                    kinds = [k.split("/", 1)[1] for k in summaries[0] if k.startswith("final_frozen_fraction/")]
                    per_kind = ", ".join(
                        f"{k} {_mean([s[f'final_frozen_fraction/{k}'] for s in summaries]):.0%}" for k in kinds
                    )
                    frozen = f"{_mean([s['final_frozen_fraction'] for s in summaries]):.1%} ({per_kind})"
            lines.append(
                "| "
                + " | ".join(
                    [
                        TASK_TITLES.get(task, task),
                        method,
                        f"{runs[0]['learning_rate']:g}",
                        ",".join(str(r["seed"]) for r in runs),
                        metrics,
                        _spread([r["train_runtime"] for r in runs], digits=0),
                        ratio_text,
                        cpu_text,
                        f"{_mean(steps):.3f}" if steps else "–",
                        params,
                        f"{_mean([r['peak_memory_mb'] for r in runs]):,.0f}",
                        frozen,
                    ]
                )
                + " |"
            )
    return "\n".join(lines) + "\n\n" + describe(results, tasks, groups, results_dir)


def describe(results: list[dict], tasks: list[str], groups: dict, results_dir: str = "benchmarks/results/glue") -> str:
    """How the table was made, from what the result files recorded."""
    commands = _unique(r["harness"]["command"] for r in results if "harness" in r)
    first = results[0]
    data = []
    for task in tasks:
        runs = [r for r in results if r["task"] == task]
        caps = _unique(r["max_train_samples"] for r in runs)
        train = _unique(r["train_samples"] for r in runs)
        cap = (
            f"capped at the first {caps[0]} training samples" if caps != [None] else f"all {train[0]} training samples"
        )
        data.append(f"{TASK_TITLES.get(task, task)}: {cap}, {_unique(r['eval_samples'] for r in runs)[0]} dev samples")
    by_method: dict[str, list[dict]] = defaultdict(list)
    for (_, method), runs in groups.items():
        by_method[method] += runs
    lrs = ", ".join(
        f"{m} {'/'.join(f'{v:g}' for v in _unique(r['learning_rate'] for r in by_method[m]))}"
        for m in [*TABLE_ORDER, *sorted(set(by_method) - set(TABLE_ORDER))]
        if m in by_method
    )
    lora = next((r for r in results if "lora" in r), None)
    seeds = "; ".join(
        f"{TASK_TITLES.get(t, t)} {','.join(str(s) for s in sorted({r['seed'] for r in results if r['task'] == t}))}"
        for t in tasks
    )
    command = "; ".join(f"`{c}`" for c in commands) if commands else "`python benchmarks/glue_compare.py`"
    lines = [
        f"How these numbers were made (all recorded in `{results_dir}/*.json`):",
        "",
        f"- Command: {command}",
        f"- Model: {first.get('base_model') or first['model']}; device: {', '.join(_unique(r['device'] for r in results))}.",
        f"- Data: {SOURCES.get(first.get('data_source'), first.get('data_source'))}; " + "; ".join(data) + ".",
        f"- Epochs: {', '.join(f'{e:g}' for e in _unique(r['num_train_epochs'] for r in results))}; batch size "
        f"{', '.join(str(b) for b in _unique(r['per_device_train_batch_size'] for r in results))}; max sequence length "
        f"{', '.join(str(x) for x in _unique(r['max_seq_length'] for r in results))}; seeds: {seeds}.",
        f"- Learning rates (AdamW, linear decay): {lrs}.",
    ]
    if lora is not None:
        lines.append(
            f"- LoRA: r {lora['lora']['r']}, alpha {lora['lora']['alpha']}, dropout {lora['lora']['dropout']}, on "
            f"{', '.join(lora['lora']['target_modules'])}; the classifier trains fully."
        )
    by_method = {}
    for r in results:
        if "neq" in r:
            by_method.setdefault(r["method"], r)
    for method, run in by_method.items():
        c = run["neq"]["config"]
        rule = (
            f"relative rule, eps_relative {c['eps_relative']:g}"
            + (f" (|v| capped at {c['eps_relative_max']:g})" if c.get("eps_relative_max") else " (no cap on |v|)")
            if c.get("criterion", "absolute") == "relative"
            else f"absolute rule, eps {c['eps']:g}"
        )
        cached = run["neq"]["summary"].get("cache_frozen_prefix", c.get("cache_frozen_prefix") is True)
        extras = ", frozen-prefix cache" if cached else ""
        if c.get("granularity", "unit") == "layer":
            extras += ", whole layers only"
        if c.get("min_loss_drop"):
            gates = [r["neq"]["summary"].get("gate_step") for r in results if r["method"] == method and "neq" in r]
            opened = sorted(g for g in gates if g is not None)
            when = "never opened"
            if opened:
                span = f"{opened[0]}–{opened[-1]}" if opened[0] != opened[-1] else f"{opened[0]}"
                when = f"opened at step {span} of the runs"
            if opened and len(opened) < len(gates):
                when += f", never in {len(gates) - len(opened)}"
            extras += f", no freezing before the training loss dropped by {c['min_loss_drop']:g} ({when})"
            wait = min(c.get("checks_from_loss_drop", 0.0), c["min_loss_drop"])
            if wait:
                starts = sorted(
                    r["neq"]["summary"].get("reference_step")
                    for r in results
                    if r["method"] == method and "neq" in r and r["neq"]["summary"].get("reference_step") is not None
                )
                span = ""
                if starts:
                    steps = f"{starts[0]}–{starts[-1]}" if starts[0] != starts[-1] else f"{starts[0]}"
                    span = f", the reference check at step {steps}"
                extras += f", held-out checks from a loss drop of {wait:g} on{span}"
        if c.get("settle_fraction"):
            extras += f", no new freezing while s is above {c['settle_fraction']:g} of its peak (settle_fraction)"
        lines.append(
            f"- {method}: {rule}, mu {c['mu']:g}, layer_threshold {c.get('layer_threshold', 1.0):g}{extras}, a check "
            f"every {_every(c['check_every'], run['neq']['summary'].get('check_every'))} on "
            f"{run['holdout_samples']} training samples, "
            + (
                "which NEq runs also train on (holdout_in_train)."
                if c.get("holdout_in_train")
                else "which NEq runs do not train on."
            )
        )
    lines += [
        "- dev metric: mean ± sample standard deviation over seeds. train time: `Trainer` train_runtime (NEq's "
        "held-out checks included); time ratio: mean train time over that of full (and, for neq_lora, of lora) "
        "fine-tuning on the same task; CPU time ratio: the same with the process CPU time of training, which other load on "
        "the machine moves far less than the wall time (a few %). step: mean optimizer step time (forward, backward, update; no checks).",
        "- trainable params: at the start → at the last NEq check. peak memory: "
        + ", ".join(_unique(r["peak_memory_source"] for r in results))
        + ". final frozen: fraction of units frozen at the last check.",
        "- Backward FLOPs and per-step savings at fixed frozen fractions are measured by `benchmarks/step_time.py`.",
    ]
    return "\n".join(lines) + "\n"


def update_readme(path: str, table: str, block: str = README_BLOCK) -> None:
    """Replace what is between the ``block`` markers (glue-results by default) in ``path``, and nothing else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--readme {path}: no such file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    first, last = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    start, end = text.find(first), text.find(last)
    if start == -1 or end < start:
        raise ValueError(f"{path} has no {first} ... {last} block: add the two markers where the GLUE table goes.")
    text = text[: start + len(first)] + "\n" + table.rstrip("\n") + "\n" + text[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    failed = [] if args.table_only else run_grid(args, argv)
    if args.dry_run:
        return 0
    shown = os.path.relpath(os.path.abspath(args.results_dir), ROOT)
    table = render_table(load_results(args.results_dir), shown if not shown.startswith("..") else args.results_dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
    with open(args.table, "w", encoding="utf-8") as f:
        f.write("# GLUE: full fine-tuning, NEq, LoRA and NEq + LoRA\n\n" + table)
    print(f"Wrote {args.table}")
    if args.readme:
        update_readme(args.readme, table, args.readme_block)
        print(f"Updated the {args.readme_block} block of {args.readme}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
