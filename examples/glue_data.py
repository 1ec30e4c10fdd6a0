"""The nine GLUE tasks: their columns and labels, the original TSV layout, and their metrics computed offline.

The TSV readers take the files that GLUE's `download_glue_data.py` writes (``<TASK>/train.tsv``, ``dev.tsv``; MNLI
``dev_matched.tsv``) and return the same columns and label ids as the Hugging Face `nyu-mll/glue` dataset, so the rest
of a script does not care where the data came from. Files are read with ``quoting=csv.QUOTE_NONE`` (GLUE sentences
contain unbalanced quotes that default CSV quoting silently merges or strips) and ``utf-8-sig`` (the MRPC files start
with a byte-order mark). As in the Hub loader, rows with missing fields are dropped (a few exist in QQP's train.tsv).

The metrics are the ones of ``evaluate.load("glue", task)`` (same names, same definitions), computed with
scikit-learn and scipy so that they work without network access.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    ``text_columns`` and ``label_names`` are those of the Hub dataset (``label_names=None``: regression).
    ``tsv_text`` and ``tsv_label`` say where they are in the original TSV files: header names, or column indices for
    the header-less CoLA files.
    """

    name: str
    directory: str
    text_columns: tuple[str, ...]
    label_names: Optional[tuple[str, ...]]
    metrics: tuple[str, ...]
    tsv_text: tuple[Union[str, int], ...]
    tsv_label: Union[str, int]
    header: bool = True
    validation_file: str = "dev.tsv"
    validation_split: str = "validation"

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    # CoLA has no header: source, label, original acceptability mark (often empty), sentence.
    "cola": GlueTask(
        "cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), (3,), 1, header=False
    ),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), ("sentence",), "label"),
    "mrpc": GlueTask(
        "mrpc",
        "MRPC",
        ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"),
        ("accuracy", "f1"),
        ("#1 String", "#2 String"),
        "Quality",
    ),
    "qqp": GlueTask(
        "qqp",
        "QQP",
        ("question1", "question2"),
        ("not_duplicate", "duplicate"),
        ("accuracy", "f1"),
        ("question1", "question2"),
        "is_duplicate",
    ),
    "stsb": GlueTask(
        "stsb",
        "STS-B",
        ("sentence1", "sentence2"),
        None,
        ("pearson", "spearmanr"),
        ("sentence1", "sentence2"),
        "score",
    ),
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        ("sentence1", "sentence2"),
        "gold_label",
        validation_file="dev_matched.tsv",
        validation_split="validation_matched",
    ),
    "qnli": GlueTask(
        "qnli", "QNLI", ("question", "sentence"), _NLI2, ("accuracy",), ("question", "sentence"), "label"
    ),
    "rte": GlueTask(
        "rte", "RTE", ("sentence1", "sentence2"), _NLI2, ("accuracy",), ("sentence1", "sentence2"), "label"
    ),
    "wnli": GlueTask(
        "wnli",
        "WNLI",
        ("sentence1", "sentence2"),
        ("not_entailment", "entailment"),
        ("accuracy",),
        ("sentence1", "sentence2"),
        "label",
    ),
}


def get_task(name: Union[str, GlueTask]) -> GlueTask:
    """The task called ``name``; also accepts GLUE's directory spelling (``SST-2``, ``STS-B``) in any case."""
    if isinstance(name, GlueTask):
        return name
    key = str(name).strip().lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}: expected one of {', '.join(TASKS)}.")
    return TASKS[key]


def parse_label(task: Union[str, GlueTask], value: str, where: str = "label") -> Union[int, float]:
    """Label id (or score) of ``value``: a label name of the Hub dataset (``entailment``) or an id (``"1"``)."""
    task = get_task(task)
    value = str(value).strip()
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: {task.name} needs a numeric score, got {value!r}.") from None
    if value in task.label_names:
        return task.label_names.index(value)
    if value.isdigit() and int(value) < task.num_labels:
        return int(value)
    raise ValueError(
        f"{where}: unknown {task.name} label {value!r}; expected one of {list(task.label_names)} or an id in "
        f"0..{task.num_labels - 1}."
    )


def read_glue_tsv(path: Union[str, os.PathLike], task: Union[str, GlueTask]) -> dict[str, list]:
    """Read one GLUE TSV file into columns named as in the Hub dataset (``text_columns`` + ``label``).

    Raises `FileNotFoundError` for a missing file and `ValueError` for a file whose header lacks the task's columns or
    that holds an unknown label.
    """
    task = get_task(task)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GLUE {task.name} file not found: {path}.")
    columns: dict[str, list] = {name: [] for name in (*task.text_columns, "label")}
    dropped = 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        first_line = 1
        if task.header:
            header = next(rows, None)
            if header is None:
                raise ValueError(f"{path} is empty; expected a GLUE {task.name} TSV with a header line.")
            wanted = (*task.tsv_text, task.tsv_label)
            missing = [c for c in wanted if c not in header]
            if missing:
                raise ValueError(
                    f"{path} has columns {header}, but GLUE {task.name} needs {missing}. Is this the {task.directory} "
                    f"file of the original GLUE layout (download_glue_data.py)?"
                )
            index = [header.index(c) for c in wanted]
            first_line = 2
        else:
            index = [*task.tsv_text, task.tsv_label]
        width = max(index) + 1
        for line, row in enumerate(rows, start=first_line):
            if not row:
                continue
            if len(row) < width:
                dropped += 1
                continue
            *texts, label = (row[i] for i in index)
            for name, text in zip(task.text_columns, texts):
                columns[name].append(text)
            columns["label"].append(parse_label(task, label, f"{path}, line {line}"))
    if dropped:
        logger.warning("Dropped %d row(s) of %s with missing fields (as the Hub GLUE loader does).", dropped, path)
    if not columns["label"]:
        raise ValueError(f"{path} holds no rows.")
    return columns


def glue_features(task: Union[str, GlueTask]):
    """`datasets.Features` of the task, as in the Hub dataset (without its ``idx`` column)."""
    from datasets import ClassLabel, Features, Value

    task = get_task(task)
    label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features({**{name: Value("string") for name in task.text_columns}, "label": label})


def glue_tsv_path(glue_dir: Union[str, os.PathLike], task: Union[str, GlueTask], split: str) -> str:
    """Path of ``split`` (``train`` or ``validation``) of ``task`` in a GLUE directory."""
    task = get_task(task)
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    name = "train.tsv" if split == "train" else task.validation_file
    return os.path.join(os.fspath(glue_dir), task.directory, name)


def load_glue_dir(glue_dir: Union[str, os.PathLike], task: Union[str, GlueTask], split: str):
    """``split`` of ``task`` read from a directory in the original GLUE layout, as a `datasets.Dataset`."""
    from datasets import Dataset

    task = get_task(task)
    path = glue_tsv_path(glue_dir, task, split)
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        present = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
        found = f"{folder} holds {present}" if present is not None else f"{folder} does not exist"
        raise FileNotFoundError(
            f"GLUE {task.name} {split} split not found: expected {path} ({found}). Point --glue_dir at a folder in the "
            f"original GLUE layout (<TASK>/train.tsv, dev.tsv), or leave --glue_dir out to load {HUB_DATASET} from "
            "the Hub."
        )
    return Dataset.from_dict(read_glue_tsv(path, task), features=glue_features(task))


def glue_metrics(
    task: Optional[Union[str, GlueTask]], predictions: Sequence, references: Sequence, is_regression: bool = False
) -> dict[str, float]:
    """The GLUE metrics of ``task`` (the keys and values of ``evaluate.load("glue", task)``), computed offline.

    ``predictions`` are class ids (or scores for STS-B). With ``task=None`` (a custom dataset) the metric is accuracy,
    or Pearson and Spearman correlations when ``is_regression``.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, refs = np.asarray(predictions), np.asarray(references)
    if preds.shape != refs.shape:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} differ in shape.")
    names = (
        get_task(task).metrics if task is not None else (("pearson", "spearmanr") if is_regression else ("accuracy",))
    )
    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(refs, preds))
        elif name == "f1":
            out[name] = float(f1_score(refs, preds))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(refs, preds))
        elif name == "pearson":
            out[name] = float(pearsonr(preds, refs)[0])
        elif name == "spearmanr":
            out[name] = float(spearmanr(preds, refs)[0])
    return out
