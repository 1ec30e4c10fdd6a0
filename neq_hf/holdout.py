"""The held-out split: carving it from the training set, and reading unit outputs on it.

Only model inputs are used (labels are dropped). Token positions are pooled by a mask-aware mean, so padding never
counts. The outputs of the previous check are kept per unit in float32 on the model's device, which costs

    4 bytes x held-out samples (on this process) x sum over layers of (hidden width of the heads + MLP width)

e.g. 256 samples of MiniLM-L6 (6 x (384 + 1536)): 11.8 MB. In a multi-process run each process keeps only its shard.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .units import UnitMap

LABEL_COLUMNS = ("labels", "label", "label_ids", "start_positions", "end_positions")
_INPUT_COLUMNS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def holdout_count(size: Union[int, float], n_train: int) -> int:
    """Number of held-out samples for ``size`` (fraction or count), validated against the training set size."""
    n = int(round(size * n_train)) if isinstance(size, float) else int(size)
    if n < 1:
        raise ValueError(
            f"The NEq held-out split would be empty: holdout_size={size} of {n_train} training samples. "
            "Raise NEqConfig.holdout_size or pass a held-out dataset explicitly (neq_dataset=...)."
        )
    if n >= n_train:
        raise ValueError(
            f"The NEq held-out split ({n} samples, holdout_size={size}) is not smaller than the training set "
            f"({n_train} samples). Lower NEqConfig.holdout_size."
        )
    return n


def split_holdout(train_dataset: Dataset, size: Union[int, float], seed: int = 42) -> tuple[Dataset, Dataset]:
    """Deterministically carve a held-out split from ``train_dataset``; returns ``(train_rest, holdout)``.

    Works for `datasets.Dataset` (through ``select``) and any sized torch dataset (through ``Subset``).
    """
    if not hasattr(train_dataset, "__len__"):
        raise ValueError(
            "NEq cannot carve a held-out split from an iterable dataset without a length; pass neq_dataset=... "
            "explicitly."
        )
    n_train = len(train_dataset)
    n = holdout_count(size, n_train)
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
) -> DataLoader:
    """A sequential loader over this process's shard of the held-out split, yielding model inputs only."""
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ValueError("The NEq held-out dataset is empty; give it at least one sample per process.")
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
    shard = Subset(dataset, list(range(process_index, len(dataset), num_processes)))
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

    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate)


class OutputRecorder:
    """Hooks that pool each layer's head and neuron outputs during a held-out pass."""

    def __init__(self, unit_map: UnitMap, kinds: list[str]):
        self.unit_map = unit_map
        self.kinds = kinds
        self.mask: Optional[torch.Tensor] = None
        self.pooled: dict[tuple[int, str], torch.Tensor] = {}

    def _hook(self, key):
        def hook(module, args):
            x = args[0].detach().float()
            if x.dim() == 3:
                mask = self.mask
                if mask is not None and mask.shape == x.shape[:2]:
                    m = mask.to(x.dtype).unsqueeze(-1)
                    x = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
                else:
                    x = x.mean(1)
            self.pooled[key] = x.reshape(x.shape[0], -1)

        return hook

    @torch.no_grad()
    def run(self, model: nn.Module, loader: DataLoader, device: torch.device, on_batch: Callable) -> None:
        """Run ``model`` over ``loader``; after each batch call ``on_batch(start, pooled)`` with the pooled outputs."""
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
