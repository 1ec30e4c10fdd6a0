"""Fine-tune a sequence classifier on a GLUE task in a plain training loop on Accelerate (no `Trainer`), with full
fine-tuning, NEq, LoRA, NEq + LoRA, or the bottom layers frozen: the twin of `glue.py`, shaped like transformers'
`run_glue_no_trainer.py`.

NEq enters the loop through the engine `neq_hf.NEq` (look for "NEq:" below): built once on the prepared model,
registered for checkpointing, called around `optimizer.step()` and after each optimizer step. Single process:

    python examples/glue_no_trainer.py --task_name mrpc --method neq --glue_dir /path/to/glue --output_dir out/mrpc \
        --num_train_epochs 3 --learning_rate 5e-5 --per_device_train_batch_size 32 --check_every 20

Several processes (DDP):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/glue_no_trainer.py ...
    python -m torch.distributed.run --nproc_per_node 2 examples/glue_no_trainer.py ... --cpu   # two CPU processes

Data, models and methods are those of `glue.py` (its `ScriptArguments`, the `NEqConfig` fields and the loop settings
below, all on one `HfArgumentParser`). `--checkpointing_steps N|epoch` saves `accelerator.save_state` folders
(`step_<n>`, `epoch_<e>`) in `--output_dir`, NEq's state included; `--resume_from_checkpoint PATH` (or `latest`)
continues from one. The run writes `results.json`, and for NEq `neq_history.json`, `neq_frozen_heatmap.png` and a
model card (`README.md`), in `--output_dir`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    get_scheduler,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # glue.py and glue_data.py live next to this script

from glue import (  # noqa: E402
    RESULTS_NAME,
    SHOWN_NEQ_LOGS,
    ScriptArguments,
    build_metric,
    count_parameters,
    format_summary,
    freeze_bottom,
    load_task_data,
    lora_config,
    method_name,
    peak_memory,
    resolve_model,
)
from glue_data import HUB_DATASET  # noqa: E402

import neq_hf  # noqa: E402
from neq_hf import NEq, NEqConfig, split_holdout  # noqa: E402
from neq_hf.model_card import (  # noqa: E402
    card_sections,
    eval_results_from_metrics,
    hub_model_id,
    model_card_tags,
    model_license,
    update_model_card,
)
from neq_hf.plotting import HEATMAP_NAME, plot_frozen_heatmap  # noqa: E402

logger = logging.getLogger(__name__)

CARD_SKELETON = (
    "---\nlibrary_name: transformers\n---\n\n# {title}\n\n## Model description\n\nMore information needed\n\n## Intended uses & limitations\n\n"
    "More information needed\n\n## Training and evaluation data\n\nMore information needed\n"
)


@dataclass
class LoopArguments:
    """The training loop: what `TrainingArguments` holds for `glue.py`."""

    output_dir: str = field(metadata={"help": "Where results, checkpoints, the model and its card go."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs, unless --max_train_steps is given."})
    max_train_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps in total; overrides --num_train_epochs."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation (and held-out) batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warm-up steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    seed: int = field(default=42, metadata={"help": "Seed of the model head, data order and dropout."})
    mixed_precision: Optional[str] = field(
        default=None, metadata={"help": "'no', 'fp16' or 'bf16' (default: Accelerate's configuration)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N optimizer steps."})
    checkpointing_steps: Optional[str] = field(
        default=None,
        metadata={"help": "Save the training state every N optimizer steps, or 'epoch' after each epoch."},
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A step_<n>/epoch_<e> folder to continue from, or 'latest'."}
    )

    def __post_init__(self):
        cs = self.checkpointing_steps
        if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) > 0):
            raise ValueError(f"--checkpointing_steps must be a number of steps >= 1 or 'epoch', got {cs!r}.")
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"--max_train_steps must be >= 1, got {self.max_train_steps}.")


def parse_args(argv: Optional[list[str]] = None) -> tuple[ScriptArguments, NEqConfig, LoopArguments]:
    """Parse ``argv`` (default: ``sys.argv[1:]``; a single ``.json`` path is read as a file of arguments)."""
    parser = HfArgumentParser((ScriptArguments, NEqConfig, LoopArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def tokenize(data, tokenizer, max_length: int, accelerator: Accelerator) -> tuple[Any, Any]:
    def encode(batch):
        return tokenizer(*(batch[c] for c in data.text_columns), truncation=True, max_length=max_length)

    out = []
    for split, name in ((data.train, "train"), (data.validation, "validation")):
        with accelerator.main_process_first():
            drop = [c for c in split.column_names if c != "label"]
            out.append(split.map(encode, batched=True, remove_columns=drop, desc=f"Tokenizing {name}"))
    return out[0], out[1]


def find_checkpoint(args: LoopArguments) -> Optional[str]:
    """The folder to resume from: the one given, or with ``latest`` the newest ``step_*``/``epoch_*`` folder."""
    path = args.resume_from_checkpoint
    if path is None or path != "latest":
        return path
    folders = [
        os.path.join(args.output_dir, d)
        for d in os.listdir(args.output_dir)
        if re.fullmatch(r"(step|epoch)_\d+", d) and os.path.isdir(os.path.join(args.output_dir, d))
    ] if os.path.isdir(args.output_dir) else []  # fmt: skip
    if not folders:
        raise ValueError(f"--resume_from_checkpoint latest: no step_*/epoch_* folder in {args.output_dir}.")
    return max(folders, key=os.path.getmtime)


def resume_position(path: str, batches_per_epoch: int, accumulation: int) -> tuple[int, int, int]:
    """(completed optimizer steps, epoch to start in, batches of that epoch to skip) for a ``step_<n>`` or
    ``epoch_<e>`` folder."""
    name = os.path.basename(os.path.normpath(path))
    match = re.fullmatch(r"(step|epoch)_(\d+)", name)
    if match is None:
        raise ValueError(f"--resume_from_checkpoint {path}: expected a step_<n> or epoch_<e> folder of this script.")
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    if match.group(1) == "epoch":
        epoch = int(match.group(2)) + 1
        return epoch * steps_per_epoch, epoch, 0
    steps = int(match.group(2))
    batches = steps * accumulation
    return steps, batches // batches_per_epoch, batches % batches_per_epoch


def evaluate(model, loader, accelerator: Accelerator, is_regression: bool, metric) -> dict[str, float]:
    model.eval()
    predictions, references = [], []
    for batch in loader:
        with torch.no_grad():
            logits = model(**batch).logits
        preds = logits.squeeze(-1) if is_regression else logits.argmax(-1)
        preds, refs = accelerator.gather_for_metrics((preds, batch["labels"]))
        predictions.append(preds.float().cpu().numpy() if is_regression else preds.cpu().numpy())
        references.append(refs.cpu().numpy())
    model.train()
    return metric(np.concatenate(predictions), np.concatenate(references))


def device_name(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_model_card(out: str, results: dict, model, neq: NEq, model_path: str, hub_id: Optional[str]) -> str:
    """The NEq model card (tags, model-index with the dev metrics, the NEq section), on top of peft's card if any."""
    path = os.path.join(out, "README.md")
    name = hub_id or os.path.basename(os.path.normpath(model_path))
    model_name = "-".join([name.rsplit("/", 1)[-1], results["task"], results["method"]])
    if not os.path.isfile(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(CARD_SKELETON.format(title=model_name))
    dataset = results.get("dataset_name")
    eval_results = (
        eval_results_from_metrics(
            results["metrics"],
            dataset_type=HUB_DATASET,
            dataset_name=dataset,
            dataset_config=results.get("dataset_config"),
            dataset_split=results.get("dataset_split"),
        )
        if dataset
        else None
    )
    update_model_card(
        path,
        neq_config=neq.config,
        summary=neq.summary(),
        tags=model_card_tags(model),
        base_model=hub_id,
        datasets=HUB_DATASET if dataset else None,
        eval_results=eval_results,
        model_name=model_name,
        time_ratio=results.get("time_ratio"),
        time_ratio_baseline=results.get("time_ratio_baseline"),
        heatmap=results["neq"].get("heatmap"),
        holdout_samples=results["holdout_samples"],
        license=model_license(model_path),
        sections=card_sections(
            base_model=hub_id,
            dataset=dataset,
            split=results.get("dataset_split"),
            method="NEq freezing" + (" of LoRA adapters" if "lora" in results["method"] else ""),
            train_samples=results["trained_samples"],
            holdout_samples=results["holdout_samples"],
            eval_samples=results["eval_samples"],
            steps=results["train_steps"],
        ),
    )
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    """Run one fine-tuning; returns the content of ``results.json``."""
    script_args, neq_config, args = parse_args(argv)
    method = script_args.method
    use_neq = method in ("neq", "neq_lora")
    # NEq switches frozen tensors to requires_grad=False mid-run, which DDP allows only with find_unused_parameters.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if use_neq else []
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
        kwargs_handlers=handlers,
        # The shuffled order is a function of the seed and the epoch, so a run resumed mid-epoch skips exactly the
        # batches it already trained on.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    import datasets
    import transformers

    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # -- data and model, as in glue.py ----------------------------------------------------------------------------
    model_path, hub_id = resolve_model(script_args.model_name_or_path)
    data = load_task_data(script_args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_length = min(script_args.max_seq_length, tokenizer.model_max_length)
    train_dataset, eval_dataset = tokenize(data, tokenizer, max_length, accelerator)
    num_labels = 1 if data.is_regression else len(data.label_names)
    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels, finetuning_task=script_args.task_name)
    if not data.is_regression:
        config.id2label = dict(enumerate(data.label_names))
        config.label2id = {name: i for i, name in enumerate(data.label_names)}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, config=config)
    if method == "freeze_bottom":
        freeze_bottom(model, script_args.freeze_bottom_layers)
    peft_config = lora_config(script_args) if method in ("lora", "neq_lora") else None
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    held_out, train_samples = None, len(train_dataset)
    if use_neq:  # NEq: a held-out split carved from the training set (inputs only), as NEqTrainer does
        rest, held_out = split_holdout(
            train_dataset,
            neq_config.holdout_size,
            neq_config.holdout_seed,
            neq_config.holdout_min_samples,
            neq_config.holdout_max_samples,
        )
        if not neq_config.holdout_in_train:  # else the probes are trained on too, as NEqTrainer does by default
            train_dataset = rest
    trainable, total = count_parameters(model)

    collator = DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None
    )
    train_loader = DataLoader(
        train_dataset, shuffle=True, collate_fn=collator, batch_size=args.per_device_train_batch_size
    )
    eval_loader = DataLoader(eval_dataset, collate_fn=collator, batch_size=args.per_device_eval_batch_size)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ],
        lr=args.learning_rate,
    )
    steps_per_epoch = math.ceil(
        math.ceil(len(train_loader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # A prepared scheduler steps once per process at each optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler
    )
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    neq = None
    if use_neq:
        # NEq: the engine, on the prepared model; its state rides along with accelerator.save_state/load_state.
        neq = NEq(model, neq_config, held_out, data_collator=collator, batch_size=args.per_device_eval_batch_size)
        accelerator.register_for_checkpointing(neq)

    completed_steps, start_epoch, skip_batches = 0, 0, 0
    checkpoint = find_checkpoint(args)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
        accelerator.load_state(checkpoint)
        completed_steps, start_epoch, skip_batches = resume_position(
            checkpoint, len(train_loader), args.gradient_accumulation_steps
        )
    if neq is not None:
        # NEq: resolve the check schedule and record the reference outputs (skipped when resuming).
        neq.setup(
            max_steps=max_steps,
            num_epochs=num_epochs if args.max_train_steps is None else None,
            samples_per_step=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        )

    # -- the loop ---------------------------------------------------------------------------------------------------
    metric, metric_source = build_metric(data.task, data.is_regression)
    logger.info(
        "%s on %s: %d samples, %d epoch(s), %d optimizer steps, %d process(es)",
        method, data.task.name if data.task else "custom data", len(train_dataset), num_epochs, max_steps,
        accelerator.num_processes,
    )  # fmt: skip
    progress = tqdm(range(max_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    step_seconds: list[float] = []
    losses: list[float] = []
    eval_metrics: dict[str, float] = {}
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    step_start = None
    model.train()
    for epoch in range(start_epoch, num_epochs):
        train_loader.set_epoch(epoch)
        batches = train_loader
        if epoch == start_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_loader, skip_batches)
        for batch in batches:
            step_start = step_start or time.perf_counter()
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if neq is not None:
                    neq.before_optimizer_step(optimizer)  # NEq: frozen rows and their optimizer state stay put
                optimizer.step()
                if neq is not None:
                    neq.after_optimizer_step(optimizer)
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float().item())
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            step_seconds.append(time.perf_counter() - step_start)
            step_start = None
            progress.update(1)
            if completed_steps % args.logging_steps == 0:
                progress.set_postfix(loss=f"{np.mean(losses[-args.logging_steps :]):.4f}")
            if neq is not None and neq.step_end(completed_steps, completed_steps / steps_per_epoch) is not None:
                shown = {k: round(v, 4) for k, v in neq.pop_logs().items() if k in SHOWN_NEQ_LOGS}
                logger.info("step %d: %s", completed_steps, shown)  # NEq: a held-out check ran
            if (
                args.checkpointing_steps not in (None, "epoch")
                and completed_steps % int(args.checkpointing_steps) == 0
            ):
                accelerator.save_state(os.path.join(args.output_dir, f"step_{completed_steps}"))
            if completed_steps >= max_steps:
                break
        if neq is not None and neq.epoch_end(completed_steps, epoch + 1) is not None:
            logger.info("epoch %d: %s", epoch + 1, {k: v for k, v in neq.pop_logs().items() if k in SHOWN_NEQ_LOGS})
        eval_metrics = evaluate(model, eval_loader, accelerator, data.is_regression, metric)
        logger.info("epoch %d: %s", epoch + 1, eval_metrics)
        if args.checkpointing_steps == "epoch":
            accelerator.save_state(os.path.join(args.output_dir, f"epoch_{epoch}"))
        if completed_steps >= max_steps:
            break
    train_runtime, train_cpu_seconds = time.perf_counter() - wall_start, time.process_time() - cpu_start
    progress.close()
    if neq is not None:
        neq.close()  # NEq: every parameter trainable again
    if not eval_metrics:  # resumed at the very end
        eval_metrics = evaluate(model, eval_loader, accelerator, data.is_regression, metric)
    memory, memory_source = peak_memory()

    # -- results, model, card -----------------------------------------------------------------------------------------
    task = data.task
    timed = step_seconds[1:] if len(step_seconds) > 1 else step_seconds
    results: dict[str, Any] = {
        "task": task.name if task is not None else "custom",
        "method": method_name(script_args),
        "loop": "accelerate",
        "model": script_args.model_name_or_path,
        "base_model": hub_id,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "num_train_epochs": num_epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": accelerator.num_processes,
        "max_seq_length": max_length,
        "data_source": data.source,
        "max_train_samples": script_args.max_train_samples,
        "max_eval_samples": script_args.max_eval_samples,
        "train_samples": train_samples,
        "trained_samples": len(train_dataset),
        "eval_samples": len(eval_dataset),
        "metrics": eval_metrics,
        "metric_source": metric_source,
        "train_runtime": train_runtime,
        "train_cpu_seconds": train_cpu_seconds,
        "train_loss": float(np.mean(losses)) if losses else None,
        "train_steps": completed_steps,
        "mean_step_seconds": sum(timed) / len(timed) if timed else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_memory_mb": memory,
        "peak_memory_source": memory_source,
        "device": device_name(accelerator),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "neq_hf": neq_hf.__version__,
        },
    }
    if task is not None:
        results.update(
            dataset=HUB_DATASET,
            dataset_name=f"GLUE {task.name.upper()}",
            dataset_config=task.name,
            dataset_split=task.validation_split,
        )
    if method == "freeze_bottom":
        results["freeze_bottom_layers"] = script_args.freeze_bottom_layers
    if peft_config is not None:
        results["lora"] = {
            "r": peft_config.r,
            "alpha": peft_config.lora_alpha,
            "dropout": peft_config.lora_dropout,
            "target_modules": sorted(accelerator.unwrap_model(model).peft_config["default"].target_modules),
        }
    if script_args.baseline_results is not None:
        with open(script_args.baseline_results) as f:
            baseline = json.load(f)
        results["time_ratio"] = results["train_runtime"] / baseline["train_runtime"]
        results["time_ratio_baseline"] = (
            f"{baseline['method']} fine-tuning ({baseline['task']}, seed {baseline['seed']})"
        )

    out = args.output_dir
    unwrapped = accelerator.unwrap_model(model)
    if neq is not None:
        history = neq.tracker.history
        results["holdout_samples"] = len(held_out)
        results["neq"] = {
            "config": neq_config.to_dict(),
            "summary": neq.summary(),
            "final_trainable_parameters": history[-1]["trainable_parameters"] if history else trainable,
        }
        if accelerator.is_main_process:
            neq.save_history(out)
            if any(h["check"] > 0 for h in history):
                title = f"NEq on {results['task']} ({method}): frozen fraction per layer"
                plot_frozen_heatmap(history, os.path.join(out, HEATMAP_NAME), title=title)
                results["neq"]["heatmap"] = HEATMAP_NAME
    accelerator.wait_for_everyone()
    if script_args.save_model:
        # Under FSDP the weights are shards on every process: gather them (a collective) for the saved model.
        sharded = accelerator.distributed_type == DistributedType.FSDP and peft_config is None
        state_dict = accelerator.get_state_dict(model) if sharded else None
        unwrapped.save_pretrained(
            out, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
        )
        if accelerator.is_main_process:
            tokenizer.save_pretrained(out)
    if accelerator.is_main_process:
        paths = {"results": os.path.join(out, RESULTS_NAME)}
        if neq is not None:
            hub_id = hub_id or hub_model_id(model_path)
            paths["model card"] = write_model_card(out, results, unwrapped, neq, model_path, hub_id)
            if results["neq"].get("heatmap"):
                paths["frozen-fraction heatmap"] = os.path.join(out, HEATMAP_NAME)
            paths["NEq history (every check, full figures)"] = os.path.join(out, "neq_history.json")
        paths["model" if script_args.save_model else "model (not saved: --save_model false)"] = out
        with open(os.path.join(out, RESULTS_NAME), "w") as f:
            json.dump(results, f, indent=2)
        print("\n" + format_summary(results, paths), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
