"""The held-out split: carving it from the training set, and reading unit outputs on it.

Only model inputs are used (labels are dropped). A unit's output vector is formed from token positions in one of two
ways (`NEqConfig.token_pooling`):

- ``"mean"`` (default): a mask-aware mean over each sample's real tokens, so padding never counts. This is a
  deliberate deviation from the paper, whose output vector keeps every output position: it bounds memory by the
  number of samples, at the price of calling unchanged a unit whose per-token pattern changes under an unchanged mean.
- ``"none"``: every real token's output (padding excluded), the paper's "every output position".

The outputs of the previous check (the reference) are kept per unit in float32 on the model's device, in one tensor
per layer and kind, allocated at its full size (sized by :func:`plan_reference`) when the first batch arrives: no
concatenation, so no second copy at the first check. They cost

    4 bytes x rows (on this process) x sum over layers of (hidden width of the heads + MLP width)

where rows is the number of held-out samples (``"mean"``) or of their real tokens (``"none"``): e.g. 256 samples of
MiniLM-L6 (6 x (384 + 1536)): 11.8 MB, and ~14x that with ``"none"`` on SST-2 sentences (~14 real tokens). In a
multi-process run each process keeps only its shard. Every checkpoint stores the same bytes again
(``neq_state_rank*.pt``). :func:`plan_reference` estimates them before the first check, warns above
``MEMORY_WARN_FRACTION`` of the device's available memory and refuses above `NEqConfig.holdout_memory_budget_mb`.

Size of a carved split (:func:`holdout_count`): a fraction of the training set is raised to
`NEqConfig.holdout_min_samples` (but never above ``MAX_FLOOR_FRACTION`` of the training set) and lowered to
`NEqConfig.holdout_max_samples`; a count is taken as given. Fewer samples than the floor give a loud warning, and a
single sample is refused: every neuron's pooled output is then a scalar and phi is +-1.

Why 64 and 2048 (``benchmarks/results/holdout_size.md``, MiniLM-L6 fine-tuned on SST-2): the relative error of a
unit's 1 - phi falls about as 1/sqrt(samples), 0.55 at 8 samples, 0.21 at 64, 0.06 at 512; decisions differ from
those of a 1,024-sample reference on 12% of units at 8 samples, 7% at 64 and 3% at 512 with the paper's absolute rule
(2.5%, 1.0% and 0.3% with the relative rule). Below 64 the noise grows fast; above, each halving of it costs 4x the
held-out pass. 2048 samples bound the reference (94 MB for MiniLM-L6, 3.7 GiB for a 7B Llama) and a check's cost.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .units import UnitMap

logger = logging.getLogger(__name__)

# A fraction-sized split is raised to NEqConfig.holdout_min_samples, but never above this share of the training set.
MAX_FLOOR_FRACTION = 0.2
# plan_reference warns when the reference outputs would take more than this share of the device's available memory.
MEMORY_WARN_FRACTION = 0.1
BYTES_PER_VALUE = 4  # float32


class HoldoutTooSmallError(ValueError):
    """The held-out split would be empty or a single sample: NEq cannot measure equilibrium in this run."""


LABEL_COLUMNS = ("labels", "label", "label_ids", "start_positions", "end_positions")
_INPUT_COLUMNS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def holdout_count(size: Union[int, float], n_train: int, min_samples: int = 64, max_samples: int = 2048) -> int:
    """Number of held-out samples for ``size`` (fraction or count), validated against the training set size.

    A fraction is raised to ``min_samples`` as far as ``MAX_FLOOR_FRACTION`` of the training set allows, and lowered
    to ``max_samples``; a count (an ``int``) is taken as given.
    """
    if isinstance(size, float):
        n = int(round(size * n_train))
        floor = min(min_samples, int(MAX_FLOOR_FRACTION * n_train))
        n = min(max(n, floor), max_samples)
    else:
        n = int(size)
    if n < 1:
        raise HoldoutTooSmallError(
            f"The NEq held-out split would be empty: holdout_size={size} of {n_train} training samples. "
            "Raise NEqConfig.holdout_size or pass a held-out dataset explicitly (neq_dataset=...)."
        )
    if n >= n_train:
        raise ValueError(
            f"The NEq held-out split ({n} samples, holdout_size={size}) is not smaller than the training set "
            f"({n_train} samples). Lower NEqConfig.holdout_size."
        )
    check_holdout_samples(n)
    return n


def check_holdout_samples(n: int, min_samples: Optional[int] = None) -> None:
    """Refuse a single held-out sample (phi degenerate); warn when ``n`` is below the floor ``min_samples``."""
    if n == 1:
        raise HoldoutTooSmallError(
            "The NEq held-out split has 1 sample: every neuron's output is then a single number, its similarity phi "
            "is always +1 or -1, and units freeze at any eps. Give it at least 2 samples (NEqConfig.holdout_size, or "
            "a larger neq_dataset); NEqConfig.holdout_min_samples (default 64) is the size that makes phi reliable."
        )
    if min_samples is not None and n < min_samples:
        logger.warning(
            "NEq: the held-out split has only %d samples, fewer than NEqConfig.holdout_min_samples=%d: the "
            "similarity phi is noisy on so few samples and equilibrium decisions will be partly random (see "
            "benchmarks/results/holdout_size.md). Use a larger training set or held-out dataset, or a larger "
            "NEqConfig.holdout_size.",
            n,
            min_samples,
        )


def split_holdout(
    train_dataset: Dataset,
    size: Union[int, float],
    seed: int = 42,
    min_samples: int = 64,
    max_samples: int = 2048,
) -> tuple[Dataset, Dataset]:
    """Deterministically carve a held-out split from ``train_dataset``; returns ``(train_rest, holdout)``.

    ``size`` is a fraction of the training set (raised to ``min_samples`` as far as ``MAX_FLOOR_FRACTION`` of the
    training set allows, lowered to ``max_samples``) or a number of samples (taken as given); see
    :func:`holdout_count`. Works for `datasets.Dataset` (through ``select``) and any sized torch dataset (through
    ``Subset``).
    """
    if not hasattr(train_dataset, "__len__"):
        raise ValueError(
            "NEq cannot carve a held-out split from an iterable dataset without a length; pass neq_dataset=... "
            "explicitly."
        )
    n_train = len(train_dataset)
    n = holdout_count(size, n_train, min_samples, max_samples)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
    held, rest = sorted(perm[:n]), sorted(perm[n:])
    if hasattr(train_dataset, "select"):
        return train_dataset.select(rest), train_dataset.select(held)
    return Subset(train_dataset, rest), Subset(train_dataset, held)


def model_input_names(model: nn.Module) -> set[str]:
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return set(inspect.signature(forward).parameters) - set(LABEL_COLUMNS) - {"kwargs", "args"}


def build_holdout_loader(
    dataset: Dataset,
    model: nn.Module,
    collator: Callable,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    min_samples: Optional[int] = None,
    group_by_length: bool = False,
) -> DataLoader:
    """A sequential loader over this process's shard of the held-out split, yielding model inputs only.

    With ``group_by_length`` the shard's samples come ordered by length, in batches cut by
    :func:`length_grouped_batches`. Refuses a held-out split of one sample, and warns (once, here) when it has fewer
    than ``min_samples``.
    """
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise HoldoutTooSmallError("The NEq held-out dataset is empty; give it at least two samples.")
    check_holdout_samples(len(dataset), min_samples if process_index == 0 else None)  # warn on one process
    if len(dataset) < num_processes:
        raise ValueError(
            f"The NEq held-out dataset has {len(dataset)} samples for {num_processes} processes; every process "
            "needs at least one. Raise NEqConfig.holdout_size."
        )
    first = dataset[0]
    if not isinstance(first, dict):
        raise ValueError(
            f"NEq held-out samples must be dicts of model inputs, got {type(first).__name__}. Tokenize the dataset "
            "first (e.g. with dataset.map(tokenizer))."
        )
    accepted = model_input_names(model)
    keep = [k for k in first if k in accepted]
    if not any(k in keep for k in _INPUT_COLUMNS):
        raise ValueError(
            f"The NEq held-out dataset has columns {sorted(first)} but the model needs one of "
            f"{[c for c in _INPUT_COLUMNS if c in accepted]} (with e.g. attention_mask). Tokenize it the same way "
            "as the training set."
        )
    lengths = sample_lengths(dataset) if group_by_length else None
    order = holdout_order(lengths, len(dataset), process_index, num_processes)
    shard = Subset(dataset, order)
    if getattr(collator, "padding_free", False) and dataclasses.is_dataclass(collator):
        # Outputs are pooled per sample: trl's padding-free collators pack a whole batch into one sequence.
        collator = dataclasses.replace(collator, padding_free=False)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator([{k: f[k] for k in keep} for f in features])
        rows = next((v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), len(features))
        if rows != len(features):
            raise ValueError(
                f"The NEq held-out collator turned {len(features)} samples into {rows} rows (a padding-free or "
                "packing collator?), but unit outputs are pooled per sample. Pass a padding collator to "
                "NEqTrainerCallback(data_collator=...)."
            )
        return {k: v for k, v in batch.items() if k in accepted}

    # A generator of its own: iterating a DataLoader otherwise draws a seed from the global RNG, and every check would
    # shift the training run's dropout masks.
    if lengths is None:
        return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=torch.Generator())
    # the shard is in length order already: the batches only cut it
    batches = length_grouped_batches([lengths[i] for i in order], batch_size)
    return DataLoader(shard, batch_sampler=batches, collate_fn=collate, generator=torch.Generator())


def sample_lengths(dataset: Dataset) -> Optional[list[int]]:
    """Each sample's number of tokens (the length of its ``input_ids``), or ``None`` when a sample has none."""
    lengths = []
    for i in range(len(dataset)):
        ids = dataset[i].get("input_ids")
        if ids is None or (torch.is_tensor(ids) and ids.dim() != 1):
            return None
        lengths.append(len(ids))
    return lengths


def holdout_order(
    lengths: Optional[list[int]], size: int, process_index: int = 0, num_processes: int = 1
) -> list[int]:
    """The held-out samples (indices into the held-out split of ``size`` samples) whose outputs a process's checks
    produce, in the order of their rows: its shard (every ``num_processes``-th sample), ordered by length (ties by
    position) when ``lengths`` are given, as :func:`build_holdout_loader` reads them with ``group_by_length``."""
    shard = list(range(process_index, size, num_processes))
    return shard if lengths is None else sorted(shard, key=lambda i: (lengths[i], i))


def length_grouped_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices ordered by length (ties by position), cut into batches of at most ``batch_size`` samples and
    at most ``batch_size`` x the mean length in padded tokens (a batch holds at least one sample).

    A batch of sequential samples is padded to its longest; ordered ones barely need padding. The token budget lets
    the short samples share large batches while the long ones split into smaller ones, and keeps every batch within
    the padded size of an average sequential batch, so memory never exceeds what the plain loader needs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    budget = batch_size * max(1, math.ceil(sum(lengths) / max(1, len(lengths))))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # lengths ascend, so the batch is padded to this sample's length
        if current and (len(current) == batch_size or (len(current) + 1) * lengths[i] > budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class OutputRecorder:
    """Hooks that read each layer's head and neuron outputs during a held-out pass.

    With ``token_pooling="mean"`` a batch gives one row per sample (the mean over its real tokens); with ``"none"``
    one row per real token, samples one after the other in loader order (padding excluded).
    """

    def __init__(self, unit_map: UnitMap, kinds: list[str], token_pooling: str = "mean"):
        if token_pooling not in ("mean", "none"):
            raise ValueError(f"token_pooling={token_pooling!r} is invalid: expected 'mean' or 'none'.")
        self.unit_map = unit_map
        self.kinds = kinds
        self.token_pooling = token_pooling
        self.mask: Optional[torch.Tensor] = None
        self.pooled: dict[tuple[int, str], torch.Tensor] = {}
        # set while a forward nested in the held-out pass must not be read (the frozen-prefix cache computing the
        # states of samples it does not hold yet runs the prefix layers on a subset of the batch)
        self.ignore: Optional[Callable[[], bool]] = None

    def _hook(self, key):
        def hook(module, args):
            if self.ignore is not None and self.ignore():
                return
            x = args[0].detach().float()
            if x.dim() == 3:
                mask = self.mask
                matches = mask is not None and mask.shape == x.shape[:2]
                if self.token_pooling == "none":
                    if mask is not None and not matches:
                        raise ValueError(
                            f"token_pooling='none' needs the attention mask {tuple(mask.shape)} to match the token "
                            f"positions {tuple(x.shape[:2])} seen by layer {key[0]}; use token_pooling='mean'."
                        )
                    x = x[mask.bool()] if matches else x.reshape(-1, x.shape[-1])
                elif matches:
                    m = mask.to(x.dtype).unsqueeze(-1)
                    x = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
                else:
                    x = x.mean(1)
            self.pooled[key] = x.reshape(x.shape[0], -1)

        return hook

    @torch.no_grad()
    def run(self, model: nn.Module, loader: DataLoader, device: torch.device, on_batch: Callable) -> None:
        """Run ``model`` over ``loader``; after each batch call ``on_batch(start, pooled)``, where ``pooled`` maps
        ``(layer, kind)`` to this batch's rows (samples or tokens) and ``start`` is the index of its first row."""
        handles = []
        for layer in self.unit_map.layers:
            if "heads" in self.kinds:
                handles.append(layer.head_observer.register_forward_pre_hook(self._hook((layer.index, "heads"))))
            if "neurons" in self.kinds:
                handles.append(layer.neuron_observer.register_forward_pre_hook(self._hook((layer.index, "neurons"))))
        accepts_cache = "use_cache" in model_input_names(model)
        was_training = model.training
        model.eval()
        start = 0
        try:
            for batch in loader:
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                if accepts_cache:
                    batch["use_cache"] = False
                self.mask = batch.get("attention_mask")
                self.pooled = {}
                model(**batch)
                on_batch(start, self.pooled)
                start += next(iter(self.pooled.values())).shape[0]
        finally:
            self.mask = None
            self.pooled = {}
            for h in handles:
                h.remove()
            model.train(was_training)


# -- memory of the reference outputs ----------------------------------------------------------------------------------
def reference_width(unit_map: UnitMap, kinds: list[str]) -> int:
    """Values per row of the reference: sum over layers of the attention width (heads x head_dim) and MLP width."""
    width = 0
    for layer in unit_map.layers:
        if "heads" in kinds:
            width += layer.num_heads * layer.head_dim
        if "neurons" in kinds:
            width += layer.num_neurons
    return width


def count_reference_rows(loader: DataLoader, token_pooling: str = "mean") -> int:
    """Rows of this process's reference: held-out samples (``"mean"``) or their real tokens (``"none"``).

    Iterates the loader once (collation only, no model call).
    """
    rows = 0
    for batch in loader:
        if token_pooling == "mean":
            rows += next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
            continue
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if torch.is_tensor(mask) and mask.dim() == 2:
            rows += int(mask.bool().sum())
        elif torch.is_tensor(ids) and ids.dim() == 2:
            rows += ids.numel()
        else:
            raise ValueError(
                "token_pooling='none' counts real tokens from the held-out batches' attention_mask (or input_ids), "
                f"but the batches have {sorted(batch)}; use token_pooling='mean'."
            )
    return rows


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes currently available on ``device`` (CUDA: free memory; CPU: available RAM), `None` when unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            try:
                import psutil
            except ImportError:
                return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
            return int(psutil.virtual_memory().available)
    except (RuntimeError, ValueError, OSError, AttributeError):
        return None
    return None


def _format_bytes(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} B"


def plan_reference(
    loader: DataLoader,
    unit_map: UnitMap,
    kinds: list[str],
    token_pooling: str,
    device: torch.device,
    budget_mb: Optional[float] = None,
) -> int:
    """Size the reference outputs before the first check; returns the number of rows to preallocate.

    Estimates ``4 B x rows x width`` (see :func:`count_reference_rows`, :func:`reference_width`), refuses with a
    `ValueError` above ``budget_mb`` MiB, and warns above ``MEMORY_WARN_FRACTION`` of the memory available on
    ``device``.
    """
    rows = count_reference_rows(loader, token_pooling)
    width = reference_width(unit_map, kinds)
    nbytes = BYTES_PER_VALUE * rows * width
    what = "held-out samples" if token_pooling == "mean" else "real held-out tokens"
    formula = (
        f"4 B x {rows} {what} on this process x {width} (sum over layers of attention + MLP widths) = "
        f"{_format_bytes(nbytes)}, kept on {device} and stored again in every checkpoint"
    )
    remedy = (
        "Lower NEqConfig.holdout_size or holdout_max_samples (fewer held-out samples), "
        + (
            "use token_pooling='mean' (one row per sample instead of one per token), "
            if token_pooling == "none"
            else ""
        )
        + "track fewer unit kinds (unit_kinds=['heads'] drops the MLP widths), or spread the held-out split over "
        "more processes"
    )
    if budget_mb is not None and nbytes > budget_mb * 2**20:
        raise ValueError(
            f"NEq's reference outputs would take {formula}: more than NEqConfig.holdout_memory_budget_mb="
            f"{budget_mb:g}. {remedy}; or raise holdout_memory_budget_mb if the device has room."
        )
    available = available_memory(device)
    if available is not None and nbytes > MEMORY_WARN_FRACTION * available:
        logger.warning(
            "NEq's reference outputs will take %s: %.0f%% of the %.1f GiB available on %s. %s.",
            formula,
            100 * nbytes / available,
            available / 2**30,
            device,
            remedy,
        )
    return rows
