"""Model cards of NEq runs: tags, metadata (`huggingface_hub.ModelCardData`) and an NEq section from a template.

The section is rendered from the packaged ``templates/neq_section.md`` and kept between two HTML comment markers, so
updating a card replaces the section instead of adding a second one; tags, datasets and model-index entries are merged
the same way. [`NEqTrainer.create_model_card`] calls :func:`update_trainer_model_card` after the Trainer wrote its own
card; :func:`update_model_card` updates any card file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from string import Template
from typing import Any, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import NEqConfig
from .plotting import HEATMAP_NAME

NEQ_SECTION_START = "<!-- neq-section:start -->"
NEQ_SECTION_END = "<!-- neq-section:end -->"
CARD_NAME = "README.md"

# Keys of `Trainer.evaluate()` that are bookkeeping, not metrics of the model.
_NOT_METRICS = {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch"}
# Metric names whose Hub metric type differs (evaluate's glue metric says "pearson", the Hub tag is "pearsonr").
_METRIC_TYPES = {"pearson": "pearsonr"}


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` (possibly wrapped by Accelerate) is a peft model."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    inner = getattr(model, "module", model)
    return isinstance(inner, PeftModel)


def model_card_tags(model: Any, tags: Optional[Union[str, Iterable[str]]] = None) -> list[str]:
    """``tags`` plus ``neq``, and ``lora`` when ``model`` is a peft model; order kept, no duplicates."""
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    extra = ["neq"] + (["lora"] if is_peft_model(model) else [])
    return _union(tags, extra)


def _union(*lists: Iterable[str]) -> list[str]:
    out: list[str] = []
    for items in lists:
        for item in items or []:
            if item not in out:
                out.append(item)
    return out


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _schedule(configured, resolved) -> str:
    if configured == "epoch" or resolved == "epoch":
        return "every epoch"
    steps = resolved if isinstance(resolved, int) else configured
    return f"every {steps} optimizer steps" + (" (auto: 10% of the run)" if configured == "auto" else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_neq_section(
    neq_config: NEqConfig,
    summary: dict,
    *,
    time_ratio: Optional[float] = None,
    time_ratio_baseline: Optional[str] = None,
    heatmap: Optional[str] = None,
    holdout_samples: Optional[int] = None,
) -> str:
    """The NEq section of a model card (Markdown, without the markers).

    Args:
        neq_config: the settings of the run.
        summary: ``NEqTrainer.neq_summary()`` (or the ``summary`` of ``neq_history.json``).
        time_ratio: measured training time of this run over that of a baseline run.
        time_ratio_baseline: what the baseline was (e.g. ``"full fine-tuning"``).
        heatmap: path of the frozen-fraction heatmap, relative to the card.
        holdout_samples: size of the held-out split actually used.
    """
    from . import __version__

    holdout = f"{neq_config.holdout_size}" + (f" ({holdout_samples} samples)" if holdout_samples is not None else "")
    every = neq_config.check_every
    settings = _table(
        ["setting", "value"],
        [
            ("`eps` (equilibrium threshold on the velocity)", f"{neq_config.eps:g}"),
            ("`mu` (velocity momentum)", f"{neq_config.mu:g}"),
            ("`warmup` (checks before any unit may freeze)", neq_config.warmup),
            ("`pin_frozen`", neq_config.pin_frozen),
            ("`check_every`", _schedule(every, summary.get("check_every"))),
            ("`holdout_size`", holdout),
            ("`unit_kinds`", ", ".join(neq_config.unit_kinds)),
            ("`freeze_embeddings`", neq_config.freeze_embeddings),
        ],
    )

    kinds = [k for k in neq_config.unit_kinds if f"final_frozen_fraction/{k}" in summary]
    units = summary.get("units") or {}
    if kinds:
        rows = []
        for kind in kinds + ["all"]:
            suffix = "" if kind == "all" else f"/{kind}"
            per_layer_count = units.get(f"{kind}_per_layer")
            count = f"{units['layers']} × {per_layer_count}" if units.get("layers") and per_layer_count else ""
            final, average = (
                summary.get(f"final_frozen_fraction{suffix}"),
                summary.get(f"average_frozen_fraction{suffix}"),
            )
            rows.append((kind, count, _percent(final), _percent(average)))
        frozen = _table(["unit kind", "units", "final frozen", "average frozen"], rows)
        columns = [(kind, which) for kind in kinds for which in ("final", "average")]
        per_layer = _table(
            ["layer"] + [f"{kind} {which}" for kind, which in columns],
            (
                [i] + [_percent(summary[f"{which}_per_layer/{kind}"][i]) for kind, which in columns]
                for i in range(len(summary[f"final_per_layer/{kinds[0]}"]))
            ),
        )
    else:
        frozen = "No check after the reference check ran, so no unit was frozen."
        per_layer = "n/a"

    cost = []
    if summary.get("checks") is not None:
        fraction = summary.get("check_time_fraction")
        share = (
            f", {fraction:.1%} of the training time ({summary.get('train_seconds', 0.0):.1f} s)" if fraction else ""
        )
        cost.append(
            f"- Held-out checks: {summary['checks']} after the reference check, "
            f"{summary.get('check_seconds', 0.0):.1f} s in total{share}."
        )
    if summary.get("reference_megabytes") is not None:
        cost.append(f"- Held-out outputs kept between checks: {summary['reference_megabytes']:.1f} MB per process.")
    if time_ratio is not None:
        baseline = time_ratio_baseline or "the baseline run"
        cost.append(f"- Measured training time: {time_ratio:.2f}× that of {baseline} on the same machine.")
    else:
        cost.append("- Training time relative to a baseline run: not measured for this card.")
    image = (
        f"\n![NEq frozen fraction per layer over the held-out checks]({heatmap})\n\n"
        "Frozen fraction of each layer's units (rows) at every held-out check (columns)."
        if heatmap
        else ""
    )

    template = Template(resources.files("neq_hf").joinpath("templates/neq_section.md").read_text(encoding="utf-8"))
    return template.substitute(
        version=__version__, settings=settings, frozen=frozen, per_layer=per_layer, cost="\n".join(cost), heatmap=image
    ).strip()


def eval_results_from_metrics(
    metrics: dict[str, Any],
    *,
    dataset_type: str,
    dataset_name: Optional[str] = None,
    dataset_config: Optional[str] = None,
    dataset_split: Optional[str] = None,
    task_type: str = "text-classification",
) -> list[EvalResult]:
    """model-index entries for ``metrics`` (name -> value; ``eval_`` prefixes and bookkeeping keys are dropped)."""
    results = []
    for name, value in metrics.items():
        name = name[len("eval_") :] if name.startswith("eval_") else name
        if name in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                dataset_type=dataset_type,
                dataset_name=dataset_name or dataset_type,
                dataset_config=dataset_config,
                dataset_split=dataset_split,
                metric_type=_METRIC_TYPES.get(name, name),
                metric_name=name.replace("_", " ").title(),
                metric_value=float(value),
            )
        )
    return results


def _result_key(result: EvalResult) -> tuple:
    # One value per task, dataset and metric: a new result replaces the old one (e.g. the Trainer's own entry).
    return result.task_type, result.dataset_type, result.metric_type


def _replace_section(text: str, section: str) -> str:
    block = f"{NEQ_SECTION_START}\n{section}\n{NEQ_SECTION_END}"
    start, end = text.find(NEQ_SECTION_START), text.find(NEQ_SECTION_END)
    if start != -1 and end > start:
        return text[:start] + block + text[end + len(NEQ_SECTION_END) :]
    # A new section goes before the Trainer's "Training procedure", so readers meet it with the results.
    anchor = text.find("\n## Training procedure")
    if anchor != -1:
        return text[: anchor + 1] + block + "\n\n" + text[anchor + 1 :]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_model_card(
    path: Union[str, os.PathLike],
    *,
    neq_config: NEqConfig,
    summary: dict,
    tags: Iterable[str] = ("neq",),
    base_model: Optional[str] = None,
    datasets: Optional[Union[str, Iterable[str]]] = None,
    eval_results: Optional[list[EvalResult]] = None,
    model_name: Optional[str] = None,
    time_ratio: Optional[float] = None,
    time_ratio_baseline: Optional[str] = None,
    heatmap: Optional[str] = None,
    holdout_samples: Optional[int] = None,
) -> ModelCard:
    """Add NEq metadata and the NEq section to the model card at ``path`` (created if missing); idempotent.

    ``library_name`` is kept when the card has one (``transformers`` or ``peft``). ``tags`` and ``datasets`` are
    merged, ``eval_results`` replace entries with the same task, dataset and metric type, and the NEq section
    replaces the previous one. Returns the saved card.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        card = ModelCard.load(path)
    else:
        card = ModelCard.from_template(ModelCardData(), template_str="---\n{{ card_data }}\n---\n")
    data = card.data
    if not data.library_name:
        data.library_name = "transformers"
    if base_model:
        data.base_model = base_model
    data.tags = _union(data.tags or [], tags)
    if datasets:
        data.datasets = _union(
            [data.datasets] if isinstance(data.datasets, str) else data.datasets or [],
            [datasets] if isinstance(datasets, str) else datasets,
        )
    if eval_results:
        new = {_result_key(r) for r in eval_results}
        data.eval_results = [r for r in data.eval_results or [] if _result_key(r) not in new] + list(eval_results)
        data.model_name = data.model_name or model_name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    section = render_neq_section(
        neq_config,
        summary,
        time_ratio=time_ratio,
        time_ratio_baseline=time_ratio_baseline,
        heatmap=heatmap,
        holdout_samples=holdout_samples,
    )
    card.text = _replace_section(card.text, section)
    card.save(path)
    return card


def update_trainer_model_card(
    trainer, arguments: dict[str, Any], *, time_ratio: Optional[float] = None, results: Optional[dict] = None
) -> ModelCard:
    """Update the card that ``Trainer.create_model_card(**arguments)`` just wrote in ``trainer.args.output_dir``.

    ``results`` (e.g. the ``results.json`` of ``examples/glue.py``) may give ``metrics`` (name -> value) with
    ``dataset``, ``dataset_name``, ``dataset_config`` and ``dataset_split`` for the model-index, and ``time_ratio``
    with ``time_ratio_baseline``. Without ``metrics``, the latest ``Trainer.evaluate()`` figures are used when a dataset
    is known (``dataset_tags``).
    """
    results = dict(results or {})
    output_dir = trainer.args.output_dir
    config = getattr(trainer.model, "config", None)
    name_or_path = getattr(config, "_name_or_path", None)
    base_model = (
        arguments.get("finetuned_from")
        or results.get("base_model")
        or (name_or_path if name_or_path and not os.path.isdir(name_or_path) else None)
    )
    dataset_tags = arguments.get("dataset_tags") or results.get("dataset")
    dataset_type = dataset_tags if isinstance(dataset_tags, str) else (list(dataset_tags)[0] if dataset_tags else None)

    metrics = results.get("metrics")
    if metrics is None:
        evals = [entry for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)]
        metrics = {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}
    dataset_args = arguments.get("dataset_args")
    eval_results = (
        eval_results_from_metrics(
            metrics,
            dataset_type=dataset_type,
            dataset_name=results.get("dataset_name")
            or (arguments.get("dataset") if isinstance(arguments.get("dataset"), str) else None),
            dataset_config=results.get("dataset_config") or (dataset_args if isinstance(dataset_args, str) else None),
            dataset_split=results.get("dataset_split"),
        )
        if dataset_type and metrics
        else None
    )
    heatmap = HEATMAP_NAME if os.path.isfile(os.path.join(output_dir, HEATMAP_NAME)) else None
    neq_dataset = getattr(trainer, "neq_dataset", None)
    return update_model_card(
        os.path.join(output_dir, CARD_NAME),
        neq_config=trainer.neq_config,
        summary=trainer.neq_summary(),
        tags=model_card_tags(trainer.model, arguments.get("tags")),
        base_model=base_model,
        datasets=dataset_tags,
        eval_results=eval_results,
        model_name=arguments.get("model_name"),
        time_ratio=time_ratio if time_ratio is not None else results.get("time_ratio"),
        time_ratio_baseline=results.get("time_ratio_baseline"),
        heatmap=heatmap,
        holdout_samples=len(neq_dataset) if neq_dataset is not None and hasattr(neq_dataset, "__len__") else None,
    )
