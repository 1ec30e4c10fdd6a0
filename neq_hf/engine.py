"""`NEq`: the framework-free engine. One object holds the held-out loader, the unit map, the equilibrium tracker, the
freezer, the check schedule and the checkpoint state; a training loop calls it around the optimizer step and at step
end. [`NEqTrainerCallback`] is a thin adapter of it for `transformers.Trainer`; a custom (Accelerate) loop calls it
directly:

```python
neq = NEq(model, NEqConfig(), held_out, data_collator=collator)  # model: after accelerator.prepare
neq.setup(max_steps=num_training_steps, samples_per_step=batch_size)  # the schedule; the reference outputs
accelerator.register_for_checkpointing(neq)  # optional: save_state/load_state carry NEq's state
for step, batch in enumerate(train_dataloader, start=1):
    accelerator.backward(model(**batch).loss)
    neq.before_optimizer_step(optimizer)
    optimizer.step()
    neq.after_optimizer_step(optimizer)
    optimizer.zero_grad()
    neq.step_end(step)  # a held-out check when one is due
neq.close()  # everything trainable again
```

Under several processes every method is called on every process: a check runs one ``all_reduce`` of three sums per
unit (see :mod:`neq_hf.tracker`), so every process takes the same decisions, and [`NEq.state_dict`] gathers every
process's shard of the reference outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers.data.data_collator import default_data_collator

from .config import NEqConfig
from .distributed import Engine, ShardedFreezer, check_engine, detect_engine, reduce_device, reshard
from .freezing import Freezer
from .holdout import (
    OutputRecorder,
    build_holdout_loader,
    count_reference_rows,
    holdout_order,
    model_input_names,
    plan_reference,
    sample_lengths,
)
from .prefix_cache import FrozenPrefixCache
from .tracker import EquilibriumTracker
from .units import UnitMap, discover_units, lora_in_model

logger = logging.getLogger(__name__)

STATE_NAME = "neq_state_rank{rank}.pt"
CONFIG_NAME = "neq_config.json"
HISTORY_NAME = "neq_history.json"
AUTO_CHECKS = 20  # checks per run with check_every='auto': the first decision comes at 10% of the run
# NEqConfig.check_budget never leaves fewer checks than this in a run (the reference, the warmup and three decisions)
MIN_BUDGET_CHECKS = 5
STATE_FORMAT = 1
# Guard rails against a collapsed run (a criterion far too loose for the regime): more than this fraction of units
# frozen at the first decision, or more than COLLAPSE_FROZEN frozen while the training loss stays within
# COLLAPSE_LOSS_CHANGE (relative) of its start.
FIRST_DECISION_MAX_FROZEN = 0.9
COLLAPSE_FROZEN = 0.8
COLLAPSE_LOSS_CHANGE = 0.05


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP wrappers: held-out passes must not run DDP's forward (it syncs buffers across
    processes, and processes may run different numbers of held-out batches)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


class NEq:
    """Neuronal-equilibrium freezing for any training loop.

    Args:
        model (`nn.Module`): the model being trained, as the loop runs it (bare, or wrapped by
            `accelerator.prepare`/DDP: the wrapper is looked through, and its DDP settings are checked).
        config ([`NEqConfig`], *optional*): NEq settings; defaults to `NEqConfig()`.
        holdout_dataset (`Dataset`, *optional*): the held-out split, tokenized like the training set (labels are
            ignored); every process reads its shard (samples ``rank, rank + world_size, ...``). Carve it with
            [`split_holdout`], and train on the whole training set (as `NEqTrainer` does by default,
            `NEqConfig.holdout_in_train`) or on the rest it returns.
        data_collator (`Callable`, *optional*): padding collator for the held-out batches (default:
            `default_data_collator`).
        batch_size (`int`, *optional*): held-out batch size when `config.holdout_batch_size` is not set (default 8).
        holdout_dataloader (`DataLoader`, *optional*): instead of `holdout_dataset`, a ready loader over this
            process's shard, sequential, yielding model inputs only. A checkpoint of such a run resumes only with the
            same number of processes.
        process_index, num_processes (`int`, *optional*): this process and the number of processes (default: from
            `torch.distributed`).
        verify_engine (`bool`, defaults to `True`): refuse engines under which frozen units would still train (see
            :func:`neq_hf.distributed.check_engine`). Adapters that check with more context pass `False`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[NEqConfig] = None,
        holdout_dataset: Optional[Dataset] = None,
        *,
        data_collator: Optional[Callable] = None,
        batch_size: Optional[int] = None,
        holdout_dataloader: Optional[DataLoader] = None,
        process_index: Optional[int] = None,
        num_processes: Optional[int] = None,
        verify_engine: bool = True,
    ):
        self.config = config if config is not None else NEqConfig()
        if not isinstance(self.config, NEqConfig):
            raise TypeError(f"config must be a NEqConfig, got {type(self.config).__name__}.")
        if (holdout_dataset is None) == (holdout_dataloader is None):
            raise ValueError(
                "NEq needs exactly one of holdout_dataset=... (e.g. `train, held_out = "
                "neq_hf.split_holdout(train_dataset, size=0.01)`) and holdout_dataloader=..."
            )
        if verify_engine:
            check_engine(None, model)  # refuses engines under which frozen units would still train
        self.model = unwrap_model(model)
        self.process_index = process_index if process_index is not None else (dist.get_rank() if _distributed() else 0)
        self.num_processes = (
            num_processes if num_processes is not None else (dist.get_world_size() if _distributed() else 1)
        )
        # The model first: a model NEq cannot map fails with that error, not with one about the held-out columns.
        self.unit_map: UnitMap = discover_units(self.model)
        self.holdout_size: Optional[int] = None  # known when NEq shards the dataset itself
        self._holdout_lengths: Optional[list[int]] = None
        if holdout_dataset is not None:
            batch_size = self.config.holdout_batch_size or batch_size or 8
            self.loader = build_holdout_loader(
                holdout_dataset,
                self.model,
                data_collator or default_data_collator,
                batch_size,
                self.process_index,
                self.num_processes,
                min_samples=self.config.holdout_min_samples,
                group_by_length=self.config.holdout_group_by_length,
            )
            # Its own generator: every iterator of a DataLoader without one draws from torch's global RNG, which would
            # shift the training run's shuffling and dropout away from a plain Trainer's with the same seed.
            self.loader.generator = torch.Generator()
            self.holdout_size = len(holdout_dataset)
            # the order of the reference rows, to re-shard them for another number of processes on resume
            self._holdout_lengths = sample_lengths(holdout_dataset) if self.config.holdout_group_by_length else None
        else:
            self.loader = holdout_dataloader
        # FSDP2 shards parameters by rows: frozen rows are kept on each process's local shard, and every held-out
        # forward is collective (all-gathers), so every process runs as many as the process with the most batches.
        self.sharded = detect_engine(None, model) is Engine.FSDP2
        self._pad_to = None
        if self.sharded and _distributed():
            self._pad_to = _max_across_processes(len(self.loader), reduce_device(self._device()))
        self.freezer = (ShardedFreezer if self.sharded else Freezer)(
            self.model,
            self.unit_map,
            freeze_embeddings=self.config.freeze_embeddings,
            row_sparse_min_frozen=self.config.row_sparse_min_frozen,
        )
        self.tracker = EquilibriumTracker(self.unit_map, self.config)
        self._resolve_granularity()
        # What the saved state belongs to, checked on resume (see `_check_resume`).
        self.tracker.fingerprints = {
            "units": unit_fingerprint(self.unit_map, self.config.unit_kinds),
            "holdout": (
                holdout_fingerprint(
                    holdout_dataset, model_input_names(self.model), self.config.holdout_group_by_length
                )
                if holdout_dataset is not None
                else loader_fingerprint(self.loader, self.process_index, self.num_processes)
            ),
        }
        self.recorder = OutputRecorder(self.unit_map, self.config.unit_kinds, self.config.token_pooling)
        # Size the reference outputs before the first check: warn or refuse, and preallocate them.
        self.tracker.reference_rows = plan_reference(
            self.loader,
            self.unit_map,
            self.config.unit_kinds,
            self.config.token_pooling,
            self._device(),
            self.config.holdout_memory_budget_mb,
        )
        first = next(iter(self.loader))
        self.freezer.locate_embeddings(self.model, lambda: self._forward_once(first))
        if self.sharded:
            reshard(self.model)
        self.prefix_cache: Optional[FrozenPrefixCache] = None  # NEqConfig.cache_frozen_prefix; hooked by setup()
        mb = self.config.prefix_cache_megabytes
        self._cache_auto = self.config.cache_frozen_prefix == "auto"  # resolved by setup(): the model may still move
        if self.config.cache_frozen_prefix is True:
            if self.sharded:
                raise ValueError(
                    "NEqConfig.cache_frozen_prefix is not supported under FSDP2 (the cached prefix would skip sharded "
                    "forwards that every process must run): set cache_frozen_prefix=False."
                )
            self.prefix_cache = FrozenPrefixCache(self.model, self.unit_map.layer_list, max_megabytes=mb)
        elif (
            (self._cache_auto or self.config.checks_skip_frozen_prefix)
            and self.config.freeze_embeddings
            and not self.sharded
        ):
            # the same cache for the held-out samples only (their states entering the lowest trainable layer)
            self.prefix_cache = FrozenPrefixCache(
                self.model, self.unit_map.layer_list, max_megabytes=mb, serve_training=False
            )
        self.check_every: Union[int, str] = self.config.check_every  # "auto" is resolved by setup()
        self._check_cost_steps: Optional[float] = None  # a check's estimated cost in optimizer steps (setup)
        self.check_seconds = 0.0
        self.waited_checks = 0  # due checks skipped while waiting for the loss (NEqConfig.checks_from_loss_drop)
        self.train_seconds = 0.0
        self._clock: Optional[float] = None
        self._pending: dict[str, float] = {}
        self._losses: list[tuple[int, float]] = []  # (step, training loss) given to observe_loss
        self._step_losses: list[torch.Tensor] = []  # losses given to record_step_loss since the last check
        self._last_check_step = 0
        self._interval: Optional[tuple[int, Optional[float]]] = None  # (step, mean training loss) read at that step
        self._max_steps: Optional[int] = None
        self._last_epoch_from: Optional[int] = None
        self._warned: set[str] = set()  # guard rails already fired in this run
        self._warnings: list[str] = []  # their messages, not logged yet
        self.warnings: list[str] = []  # every guard-rail message of this run (also in the summary)

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(
        self,
        max_steps: Optional[int] = None,
        num_epochs: Optional[int] = None,
        samples_per_step: Optional[int] = None,
    ) -> NEq:
        """Resolve the check schedule, start the training clock and record the reference outputs (check 0) unless
        a state was loaded. Call it before the first optimizer step, on every process.

        Args:
            max_steps: optimizer steps of the run (resolves `check_every="auto"`, validates the schedule).
            num_epochs: epochs of the run, when it is bounded by epochs (validates `check_every="epoch"`).
            samples_per_step: training samples one optimizer step reads on this process (per-device batch size x
                gradient accumulation steps); with `check_every="auto"` it bounds the checks' cost by
                `NEqConfig.check_budget`. `None`: no bound.
        """
        # only the automatic schedule has a budget: no pass over the held-out loader, no collective otherwise
        budgeted = self.config.check_every == "auto" and self.config.check_budget > 0
        cost = self.check_cost_steps(samples_per_step) if budgeted else None
        self.check_every = resolve_schedule(self.config, max_steps, num_epochs, check_cost_steps=cost)
        self._check_cost_steps = cost
        self._resolve_granularity()  # the model may have moved since NEq was built
        self._max_steps = max_steps
        # the first step of the last epoch: from there no training sample is drawn again, so a training batch with no
        # cached sample runs without the frozen-prefix cache
        self._last_epoch_from = None
        if max_steps and max_steps > 0 and num_epochs and num_epochs > 0:
            self._last_epoch_from = (num_epochs - 1) * (max_steps // num_epochs)
        if self._cache_auto and self.prefix_cache is not None and not self.prefix_cache.located:
            self.prefix_cache.serve_training = self._auto_cache_training()
            if not (self.prefix_cache.serve_training or self.config.checks_skip_frozen_prefix):
                self.prefix_cache = None
        self._locate_prefix_cache()  # (again after close(): a resumed run rebuilds the cache)
        self._clock = time.perf_counter()
        self._set_reuse_ahead(0)
        if self.tracker.t == 0 and not self._checks_wait_for_loss():
            self.run_check(0, 0.0)  # the reference outputs
        return self

    def _locate_prefix_cache(self) -> None:
        """Hook the frozen-prefix cache; a model it does not support trains without it where that was not asked for
        explicitly (`cache_frozen_prefix="auto"`: the checks alone still use it), and its checks run the whole model."""
        cache = self.prefix_cache
        while cache is not None:
            try:
                cache.locate(lambda: self._forward_once(next(iter(self.loader))))
                return
            except ValueError as err:
                if cache.serve_training and not self._cache_auto:
                    raise
                if cache.serve_training and self.config.checks_skip_frozen_prefix:
                    logger.info("NEq: the frozen-prefix cache serves the held-out checks only (%s)", err)
                    cache.serve_training = False
                else:
                    logger.info("NEq: held-out checks run the whole model (%s)", err)
                    self.prefix_cache = cache = None

    def _set_reuse_ahead(self, global_step: int) -> None:
        """Tell the frozen-prefix cache whether the training samples of the steps after ``global_step`` are drawn again
        later in the run (they are not in the last epoch)."""
        cache = self.prefix_cache
        if cache is not None and cache.serve_training and self._last_epoch_from is not None:
            cache.reuse_ahead = global_step < self._last_epoch_from

    def check_cost_steps(self, samples_per_step: Optional[int]) -> Optional[float]:
        """What one held-out check costs in optimizer steps, estimated from sample counts (see
        `NEqConfig.check_budget`): this process's held-out samples, read forward once, against `samples_per_step`
        read forward and backward (x3; x2 with LoRA). The largest value over the processes, so that they agree on
        the schedule. `None` when `samples_per_step` is."""
        if not samples_per_step or samples_per_step < 1:
            return None
        per_step = samples_per_step * (2 if lora_in_model(self.model) else 3)
        # one row per held-out sample with mean pooling: the count made when the reference was sized
        rows = self.tracker.reference_rows if self.config.token_pooling == "mean" else None
        held = rows if rows is not None else count_reference_rows(self.loader, "mean")
        if _distributed():
            held = _max_across_processes(held, reduce_device(self._device()))
        return held / per_step

    def _resolve_granularity(self) -> None:
        if self.config.granularity == "auto":
            # On a GPU the per-row bookkeeping of partly frozen tensors costs host time per tensor and step: more than
            # it saves on a small, host-bound model (MiniLM-L6, 22M parameters, on an H200: 1.7-2.1x a plain step),
            # less on compute-bound ones (BERT-base, 109M: 0.88-0.96x; BERT-large: 0.80-0.94x). benchmarks/step_time.py
            small = sum(p.numel() for p in self.model.parameters()) < AUTO_UNIT_MIN_PARAMETERS
            self.tracker.granularity = "layer" if self._device().type == "cuda" and small else "unit"

    def _auto_cache_training(self) -> bool:
        """`NEqConfig.cache_frozen_prefix="auto"`: serve training forwards from the cache when the model trains on a
        CPU (there it pays in time: README, "GLUE"), not on an accelerator, where the states kept in CPU RAM cost more
        to bring back than the prefix costs to run (an SST-2 run took 2.7x as long on an H200), nor with gradient
        checkpointing, which the training cache refuses. (Under FSDP2 or without frozen embeddings `__init__` builds no
        cache at all.)"""
        if self._device().type != "cpu":
            return False
        return not any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _forward_once(self, batch) -> None:
        device = self._device()
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        finally:
            self.model.train(was_training)

    # -- in the training loop -------------------------------------------------------------------------------------
    def before_optimizer_step(self, optimizer) -> None:
        """Call just before ``optimizer.step()``. An Accelerate optimizer inside ``accelerator.accumulate`` that will
        skip this step (gradients still accumulating) is left alone, so the calls may wrap every ``step()``."""
        if not _skips_step(optimizer):
            self.freezer.before_optimizer_step(optimizer)

    def after_optimizer_step(self, optimizer) -> None:
        """Call just after ``optimizer.step()``: the frozen rows and their optimizer state stay as they were."""
        if not _skips_step(optimizer):
            self.freezer.after_optimizer_step(optimizer)

    def step_end(
        self, global_step: int, epoch: Optional[float] = None, loss: Optional[float] = None
    ) -> Optional[dict]:
        """Call after optimizer step number ``global_step`` (1-based); runs a check when one is due and returns its
        record, else `None`. ``loss`` (optional): this step's training loss, for the collapse warning (see
        [`observe_loss`])."""
        if loss is not None:
            self.observe_loss(global_step, loss)
        self._set_reuse_ahead(global_step)
        if self.check_every != "epoch" and global_step % int(self.check_every) == 0:
            return self._due_check(global_step, epoch)
        return None

    def epoch_end(self, global_step: int, epoch: Optional[float] = None) -> Optional[dict]:
        """Call at the end of every epoch; runs a check with `check_every="epoch"`."""
        if self.check_every == "epoch":
            return self._due_check(global_step, epoch)
        return None

    def _due_check(self, global_step: int, epoch: Optional[float]) -> Optional[dict]:
        if self.tracker.t == 0 and self._checks_wait_for_loss() and self._before_checks_start(global_step):
            self.waited_checks += 1
            return None
        return self.run_check(global_step, epoch)

    def _checks_wait_for_loss(self) -> bool:
        """`NEqConfig.checks_from_loss_drop`: with the progress gate on, the checks start once the loss has dropped."""
        return bool(self.config.min_loss_drop) and self.config.checks_from_loss_drop > 0

    def _before_checks_start(self, global_step: int) -> bool:
        """Whether a due check waits for the training loss (`NEqConfig.checks_from_loss_drop`): True while the loss
        of the last interval is above ``(1 - checks_from_loss_drop) x`` its start (the first interval's). Without a
        loss to read the checks start at once, and the gate's own warnings apply."""
        tracker = self.tracker
        now = self._interval_loss(global_step)
        self._last_check_step = global_step
        if now is None or not math.isfinite(now):
            return False
        if tracker.loss_start is None:
            tracker.loss_start = now
            return True
        if self._dropped_by(now, min(self.config.checks_from_loss_drop, self.config.min_loss_drop)):
            return False
        self._warn_gate_closed(global_step, now)
        return True

    # -- checks ---------------------------------------------------------------------------------------------------
    def _all_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        if not _distributed():
            return flat
        buf = flat.to(reduce_device(self._device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()

    def run_check(self, global_step: int, epoch: Optional[float] = None) -> dict:
        """Run one held-out check now, apply its decisions and return its record."""
        start = time.perf_counter()
        device = self._device()

        cache = self.prefix_cache
        # the frozen prefix's outputs cannot change: the pass starts above it (the tracker keeps their last values)
        # (the depth as of now: decisions applied since the last forward count)
        depth = cache.update() if cache is not None else 0
        skip = self.config.checks_skip_frozen_prefix and 0 < depth < len(self.unit_map.layer_list)

        def run_pass(on_batch):
            if skip:
                self.tracker.constant_layers = depth
                self.recorder.ignore = lambda: cache.computing
                try:
                    with cache.serving_eval():
                        self.recorder.run(self.model, self.loader, device, on_batch)
                finally:
                    self.tracker.constant_layers = 0
                    self.recorder.ignore = None
            elif self._pad_to is None:
                self.recorder.run(self.model, self.loader, device, on_batch)
            else:
                real, seen = len(self.loader), [0]

                def on_real_batch(start, pooled):
                    seen[0] += 1
                    if seen[0] <= real:  # the padding forwards only keep the collectives in step
                        on_batch(start, pooled)

                self.recorder.run(self.model, _Padded(self.loader, self._pad_to), device, on_real_batch)
            if self.sharded:
                reshard(self.model)

        self._update_gate(global_step)
        figures = self.tracker.check(run_pass, self._all_reduce)
        self.freezer.apply(self.tracker.unit_active())
        if self.prefix_cache is not None:
            self.prefix_cache.update(self.freezer)
        elapsed = time.perf_counter() - start
        self.check_seconds += elapsed
        if figures["nonfinite_units"]:
            logger.warning(
                "NEq: %d unit(s) had non-finite outputs on the held-out split at step %d; they are kept trainable.",
                figures["nonfinite_units"],
                global_step,
            )
        record = {"step": global_step, "epoch": epoch, "seconds": elapsed, **figures}
        record["trainable_parameters"] = self.freezer.trainable_parameters()
        record["backward_stops_at_layer"] = self.freezer.stop_layer
        self.tracker.history.append(record)
        if record["check"] > 0:
            self._pending = log_items(record)
        self._guard_first_decision(record)
        return record

    def pop_logs(self) -> dict[str, float]:
        """NEq figures of the latest check not logged yet (``neq/...`` keys, no wall-clock figures: those are in
        [`summary`]), plus ``neq/warning`` when a guard rail fired since, for the loop's logger."""
        pending, self._pending = self._pending, {}
        if self._warnings:
            pending["neq/warning"] = " | ".join(self._warnings)
            self._warnings = []
        return pending

    # -- training-progress gate -----------------------------------------------------------------------------------
    def record_step_loss(self, loss: torch.Tensor) -> None:
        """Give one training step's loss (a tensor, e.g. what ``Trainer.training_step`` returns) to the progress gate
        (`NEqConfig.min_loss_drop`). It is read at the next check, so recording it costs no device synchronisation."""
        if self.config.min_loss_drop and self.tracker.gate_step is None and torch.is_tensor(loss):
            self._step_losses.append(loss.detach().float().mean())

    def _interval_loss(self, global_step: int) -> Optional[float]:
        """Mean training loss since the last due check: the recorded step losses (averaged over processes), else the
        logged ones given to [`observe_loss`]; `None` when there is none. Read once per step (a second call at the
        same step returns the same value)."""
        if self._interval is not None and self._interval[0] == global_step:
            return self._interval[1]
        if self._step_losses:
            losses, self._step_losses = torch.stack(self._step_losses), []
            flat = torch.stack([losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)])
            flat = self._all_reduce(flat.double().cpu())
            now = float(flat[0] / flat[1])
        else:
            logged = [v for s, v in self._losses if self._last_check_step < s <= global_step]
            now = sum(logged) / len(logged) if logged else None
        self._interval = (global_step, now)
        return now

    def _update_gate(self, global_step: int) -> None:
        """Hold every decision until the training loss has dropped by `min_loss_drop` from its start (the mean of the
        first check interval); open for good from there."""
        tracker, drop = self.tracker, self.config.min_loss_drop
        if not drop or tracker.gate_step is not None:
            tracker.hold = False
            return
        now = self._interval_loss(global_step)
        self._last_check_step = global_step
        tracker.hold = True
        if now is None or not math.isfinite(now):
            if tracker.t >= self.config.warmup + 1 and not self._losses and not self._step_losses:
                self._warn(
                    "gate_no_loss",
                    "NEqConfig.min_loss_drop needs the training loss, and none has been seen yet: NEqTrainerCallback "
                    "reads it from the Trainer's logs, so lower logging_steps (or use NEqTrainer, which sees every "
                    "step's loss), or set min_loss_drop=0 to freeze without the gate.",
                )
            return
        if tracker.loss_start is None:
            tracker.loss_start = now
            return
        if self._dropped_by(now, drop):
            tracker.gate_step, tracker.hold = global_step, False
            return
        self._warn_gate_closed(global_step, now)

    def _dropped_by(self, now: float, drop: float) -> bool:
        """Whether the interval loss ``now`` is at least ``drop`` (a fraction) below the start."""
        start = self.tracker.loss_start
        return now <= (1 - drop) * start or start <= 0

    def _warn_gate_closed(self, global_step: int, now: float) -> None:
        if self._max_steps and global_step >= self._max_steps // 2:
            self._warn(
                "gate_closed",
                f"half of the run has passed and the training loss has not dropped by NEqConfig.min_loss_drop="
                f"{self.config.min_loss_drop:g} from its start ({self.tracker.loss_start:.4g} -> {now:.4g}), so NEq "
                "has frozen nothing: the run is still on its initial plateau, or the task's loss cannot drop that "
                "much. Lower min_loss_drop (0 disables the gate) if the run is learning.",
            )

    # -- guard rails ----------------------------------------------------------------------------------------------
    def observe_loss(self, global_step: int, loss: float) -> None:
        """Record the training loss at ``global_step`` (a step's loss, or the mean of a logging window): NEq warns
        when most units are frozen while the loss has not moved from its start, a sign that the run stopped learning
        (the Trainer adapter passes every logged ``loss``)."""
        loss = float(loss)
        if not math.isfinite(loss):
            return
        self._losses.append((global_step, loss))
        if "loss" in self._warned:
            return
        checks = [h for h in self.tracker.history if h["check"] > 0]
        if not checks or checks[-1]["frozen_fraction"] <= COLLAPSE_FROZEN:
            return
        frozen_at = next(h["step"] for h in checks if h["frozen_fraction"] > COLLAPSE_FROZEN)
        after = [v for s, v in self._losses if s > frozen_at]  # losses of steps trained with most units frozen
        if not after:
            return
        # the start: the losses observed up to the first similarity check, else the first one observed
        start_values = [v for s, v in self._losses if s <= checks[0]["step"]] or [self._losses[0][1]]
        start, now = sum(start_values) / len(start_values), sum(after) / len(after)
        if abs(now - start) > COLLAPSE_LOSS_CHANGE * abs(start):
            return
        self._warn(
            "loss",
            f"{checks[-1]['frozen_fraction']:.0%} of units are frozen (more than {COLLAPSE_FROZEN:.0%} since step "
            f"{frozen_at}) while the training loss has not moved from its start ({start:.4g} -> {now:.4g}): the "
            f"run has probably stopped learning. {self._loosen_hint()}",
        )

    def _guard_first_decision(self, record: dict) -> None:
        if record["check"] != self.config.warmup + 1 or record["frozen_fraction"] <= FIRST_DECISION_MAX_FROZEN:
            return
        self._warn(
            "first_decision",
            f"{record['frozen_fraction']:.0%} of units froze at the first decision (check {record['check']}, step "
            f"{record['step']}): the equilibrium threshold is far too loose for this run, which then barely learns. "
            f"{self._loosen_hint()}",
        )

    def _loosen_hint(self) -> str:
        cfg = self.config
        if cfg.criterion == "absolute":
            rule = f"lower NEqConfig.eps (now {cfg.eps:g}) or use criterion='relative' (scale-free)"
        else:
            rule = f"lower NEqConfig.eps_relative (now {cfg.eps_relative:g})"
            if cfg.eps_relative_max > 0:
                rule += f" or NEqConfig.eps_relative_max (now {cfg.eps_relative_max:g})"
        if cfg.layer_threshold < 1:
            rule += f", raise NEqConfig.layer_threshold (now {cfg.layer_threshold:g}: whole layers freeze from there)"
        size = f"{self.holdout_size} samples" if self.holdout_size is not None else "its size"
        return f"To freeze less: {rule}, or raise NEqConfig.holdout_size (the held-out split has {size})."

    def _warn(self, name: str, message: str) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        self._warnings.append(message)
        self.warnings.append(message)
        logger.warning("NEq: %s", message)

    @property
    def frozen(self) -> dict[tuple[int, str], torch.Tensor]:
        """The current masks: ``{(layer, kind): bool tensor}``, `True` for a frozen unit."""
        return self.tracker.frozen

    # -- checkpoint state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """NEq's state, for `accelerator.register_for_checkpointing` (or `torch.save`).

        Collective under several processes (call it on every process, as `accelerator.save_state` does): the
        reference outputs are per process, so every process's shard is gathered into the returned dict, which any
        process can then save alone.
        """
        tracker = self.tracker.state_dict()
        shard = tracker.pop("reference")
        if _distributed():
            shards: list = [None] * dist.get_world_size()
            dist.all_gather_object(shards, shard)
        else:
            shards = [shard]
        return {
            "format": STATE_FORMAT,
            "tracker": tracker,
            "reference_shards": shards,
            "holdout_size": self.holdout_size,
            "check_every": self.check_every,
            "check_seconds": self.check_seconds,
            "waited_checks": self.waited_checks,
            "train_seconds": self.train_seconds + self._elapsed(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what [`state_dict`] returned (on every process) and apply the restored masks.

        Call it before or after [`setup`]: before, `setup` skips the reference check. The number of processes may
        differ from the saved run's when NEq built the held-out loader itself (the reference outputs are re-sharded).
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"Unknown NEq state format {state.get('format')!r}; resume with the neq_hf version that saved it."
            )
        self._check_resume(
            state["tracker"], "this NEq state", "load the Trainer/Accelerate checkpoint without NEq's state"
        )
        shards = state["reference_shards"]
        tracker = dict(state["tracker"], reference=self._own_shard(shards, state.get("holdout_size")))
        self.tracker.load_state_dict(tracker, self._device())
        self.freezer.apply(self.tracker.unit_active())
        if self.prefix_cache is not None:
            self.prefix_cache.update(self.freezer)
        self.check_every = state["check_every"]
        self.check_seconds = state["check_seconds"]
        self.waited_checks = state.get("waited_checks", 0)
        self.train_seconds = state["train_seconds"]
        if self._clock is not None:
            self._clock = time.perf_counter()

    def _own_shard(self, shards: list, holdout_size: Optional[int]) -> Optional[list]:
        if shards[0] is None:
            return None
        if len(shards) == self.num_processes:
            return shards[self.process_index]
        if self.config.token_pooling == "none":
            raise ValueError(
                "This NEq state holds per-token reference outputs (token_pooling='none') of "
                f"{len(shards)} process(es), which cannot be re-sharded over {self.num_processes}: resume with the "
                "same number of processes."
            )
        if holdout_size is None or self.holdout_size != holdout_size:
            raise ValueError(
                f"This NEq state was saved by {len(shards)} process(es) and is loaded by {self.num_processes}, which "
                "needs a held-out dataset given as holdout_dataset=... (the same one in both runs) so that NEq can "
                "re-shard the reference outputs. Resume with the same number of processes, or pass holdout_dataset."
            )
        saved, now = len(shards), self.num_processes
        rows = [holdout_order(self._holdout_lengths, holdout_size, r, saved) for r in range(saved)]
        mine = holdout_order(self._holdout_lengths, holdout_size, self.process_index, now)
        out = []
        for key_index in range(len(shards[0])):
            parts = [s[key_index] for s in shards]
            full = parts[0].new_empty((holdout_size,) + tuple(parts[0].shape[1:]))
            for order, part in zip(rows, parts):
                full[order] = part
            out.append(full[mine].clone())
        return out

    def save_checkpoint(self, folder: str) -> None:
        """Write this process's state to ``folder`` (the Trainer's checkpoint layout: one file per process)."""
        os.makedirs(folder, exist_ok=True)
        torch.save(self.tracker.state_dict(), os.path.join(folder, STATE_NAME.format(rank=self.process_index)))
        if self.process_index == 0:
            with open(os.path.join(folder, CONFIG_NAME), "w") as f:
                f.write(self.config.to_json_string())

    def load_checkpoint(self, folder: str) -> bool:
        """Read what [`save_checkpoint`] wrote and apply the restored masks; `False` (with a warning) when this
        process's file is missing."""
        path = os.path.join(folder, STATE_NAME.format(rank=self.process_index))
        if not os.path.isfile(path):
            logger.warning(
                "Resuming without NEq state (%s not found): NEq starts over with a new reference check.", path
            )
            return False
        remedy = (
            f"delete the NEq state files ({STATE_NAME.format(rank='*')}) of {folder}: the run then resumes from the "
            "checkpoint and NEq starts over with a new reference check"
        )
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "keys" not in state:
                raise ValueError(f"a {type(state).__name__}, not a NEq state")
        except Exception as err:
            raise ValueError(
                f"The NEq state file {path} cannot be read ({type(err).__name__}: {err}): it is truncated or "
                f"corrupt. To resume from this checkpoint anyway, {remedy}; or resume from another checkpoint."
            ) from err
        self._check_resume(state, path, remedy)
        self.tracker.load_state_dict(state, self._device())
        self.freezer.apply(self.tracker.unit_active())
        if self.prefix_cache is not None:
            self.prefix_cache.update(self.freezer)
        return True

    def _check_resume(self, saved: dict, source: str, remedy: str) -> None:
        """Refuse a saved state recorded on another unit map or another held-out split (its reference outputs would
        be compared with outputs of other units or samples); log settings that changed (legitimate on resume)."""
        fingerprints = saved.get("fingerprints") or {}  # states saved before fingerprints: nothing to compare
        mine = self.tracker.fingerprints
        how = f"Resume with the model and the held-out settings of the saved run, or {remedy}."
        units = fingerprints.get("units")
        if units is not None and units != mine["units"]:
            raise ValueError(
                f"The NEq state in {source} was recorded on other units than this model's "
                f"({_differences(units, mine['units'])}). {how}"
            )
        held, now = fingerprints.get("holdout"), mine["holdout"]
        if held is not None and now is not None and held.get("scope") == now.get("scope") and held != now:
            settings = _config_changes(saved.get("config") or {}, self.config.to_dict(), HOLDOUT_SETTINGS)
            raise ValueError(
                f"The held-out split differs from the one the NEq state in {source} was recorded on "
                f"({_differences(held, now)}{'; settings: ' + settings if settings else ''}): its reference outputs "
                f"belong to other samples, so the similarity phi would compare unrelated outputs. {how}"
            )
        changed = _config_changes(saved.get("config") or {}, self.config.to_dict())
        if changed:
            logger.warning("NEq: resuming with changed settings (%s); they apply from the next check.", changed)

    # -- end of training and results ------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.perf_counter() - self._clock if self._clock is not None else 0.0

    def close(self) -> None:
        """Stop the training clock and release the model: every managed parameter trainable again, dense forward,
        no backward stop. The tracker (masks, history) stays readable."""
        self.train_seconds += self._elapsed()
        self._clock = None
        self.freezer.release()
        if self.prefix_cache is not None:
            self.prefix_cache.close()

    def save_history(self, output_dir: str) -> str:
        """Write the settings, the summary and every check's record to ``output_dir/neq_history.json``."""
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, HISTORY_NAME)
        with open(path, "w") as f:
            json.dump(
                {"config": self.config.to_dict(), "summary": self.summary(), "checks": self.tracker.history},
                f,
                indent=1,
            )
        return path

    def summary(self) -> dict:
        """Final and average frozen fractions (overall, per kind, per layer) and what the checks cost."""
        checks = [h for h in self.tracker.history if h["check"] > 0]
        kinds = self.config.unit_kinds
        train_seconds = self.train_seconds + self._elapsed()
        out = {
            "units": self.unit_map.summary(),
            "checks": len(checks),
            # NEqConfig.checks_from_loss_drop: the step of the reference check (None: not made yet)
            "reference_step": self.tracker.history[0]["step"] if self.tracker.history else None,
            "waited_checks": self.waited_checks,
            "check_every": self.check_every,
            "check_seconds": self.check_seconds,
            "train_seconds": train_seconds,
            "check_time_fraction": self.check_seconds / train_seconds if train_seconds else None,
            # NEqConfig.check_budget: a check's cost in optimizer steps, estimated from sample counts
            "check_cost_steps_estimate": self._check_cost_steps,
            "reference_megabytes": self.tracker.reference_bytes() / 2**20,
            "holdout_samples": self.holdout_size,
            "granularity": self.tracker.granularity,
            # NEqConfig.cache_frozen_prefix as resolved: whether training forwards were served from the cache
            "cache_frozen_prefix": self.prefix_cache is not None and self.prefix_cache.serve_training,
            "gate_step": self.tracker.gate_step,  # NEqConfig.min_loss_drop: the step freezing was allowed from
            "loss_start": self.tracker.loss_start,
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        if self.prefix_cache is not None:
            out["prefix_cache"] = self.prefix_cache.summary()
        if not checks:
            # nothing measured yet (e.g. the checks still wait for the loss: NEqConfig.checks_from_loss_drop), so
            # nothing was frozen
            out["final_trainable_parameters"] = self.freezer.trainable_parameters()
            out["final_frozen_fraction"] = out["average_frozen_fraction"] = 0.0
            for kind in kinds:
                out[f"final_frozen_fraction/{kind}"] = out[f"average_frozen_fraction/{kind}"] = 0.0
                out[f"final_per_layer/{kind}"] = [0.0] * len(self.tracker.layers)
                out[f"average_per_layer/{kind}"] = [0.0] * len(self.tracker.layers)
            return out
        last = checks[-1]
        out["final_trainable_parameters"] = last["trainable_parameters"]
        out["final_frozen_fraction"] = last["frozen_fraction"]
        # averages over the checks that were due after step 0, those skipped while the checks waited for the loss
        # (NEqConfig.checks_from_loss_drop) and a late reference check counting as checks that froze nothing
        due = len(checks) + self.waited_checks + (1 if self.tracker.history[0]["step"] > 0 else 0)
        out["average_frozen_fraction"] = sum(h["frozen_fraction"] for h in checks) / due
        for kind in kinds:
            out[f"final_frozen_fraction/{kind}"] = last[f"frozen_fraction/{kind}"]
            out[f"average_frozen_fraction/{kind}"] = sum(h[f"frozen_fraction/{kind}"] for h in checks) / due
            out[f"final_per_layer/{kind}"] = last[f"per_layer/{kind}"]
            layers = len(last[f"per_layer/{kind}"])
            out[f"average_per_layer/{kind}"] = [
                sum(h[f"per_layer/{kind}"][i] for h in checks) / due for i in range(layers)
            ]
        return out


def _max_across_processes(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class _Padded:
    """The batches of ``loader``, then its first batch again until there are ``length`` of them."""

    def __init__(self, loader, length: int):
        self.loader, self.length = loader, length

    def __iter__(self):
        first, n = None, 0
        for batch in self.loader:
            first = batch if first is None else first
            n += 1
            yield batch
        for _ in range(self.length - n):
            yield first

    def __len__(self) -> int:
        return self.length


def _skips_step(optimizer) -> bool:
    """Whether ``optimizer.step()`` is a no-op now: Accelerate's optimizer steps only when gradients are synced."""
    state = getattr(optimizer, "gradient_state", None)
    return state is not None and not state.sync_gradients


def resolve_schedule(
    config: NEqConfig,
    max_steps: Optional[int],
    num_epochs: Optional[int],
    check_cost_steps: Optional[float] = None,
) -> Union[int, str]:
    """The check interval of a run; raises a `ValueError` when the run is too short for a single decision.

    `"auto"` becomes `AUTO_CHECKS` checks per run, spaced further apart where they would cost more than
    `config.check_budget` of the training compute (a check costing `check_cost_steps` optimizer steps; see
    `NEq.check_cost_steps`), but not beyond `MIN_BUDGET_CHECKS` checks per run.
    """
    every = config.check_every
    if every == "auto":
        every = max(1, round(max_steps / AUTO_CHECKS)) if max_steps and max_steps > 0 else "epoch"
        if every != "epoch" and check_cost_steps and config.check_budget > 0:
            needed = math.ceil(check_cost_steps / config.check_budget - 1e-9)
            every = max(every, min(needed, max_steps // MIN_BUDGET_CHECKS))
    if every == "epoch":
        n_checks, what = num_epochs, f"num_train_epochs={num_epochs}"
    else:
        n_checks, what = (max_steps // every if max_steps and max_steps > 0 else None), f"max_steps={max_steps}"
    needed = config.warmup + 1
    if n_checks is not None and n_checks < needed:
        if max_steps and max_steps >= needed:
            hint = f"Use a smaller number of steps, e.g. check_every={max(1, max_steps // (needed + 2))}."
        elif max_steps and max_steps > 0:
            hint = f"Train for at least {needed} optimizer steps (with check_every=1)."
        else:
            hint = "Train for more epochs, or set check_every to a number of steps."
        raise ValueError(
            f"NEqConfig.check_every={config.check_every!r} leaves {n_checks} held-out check(s) in this run ({what}), "
            f"but a decision needs {needed} (warmup={config.warmup} + 1): NEq would never freeze anything. {hint}"
        )
    return every


def log_items(record: dict) -> dict[str, float]:
    """A check's record as flat ``neq/...`` log keys (per-layer lists become ``neq/<kind>/layer_<i>``). Wall-clock
    figures stay out (they belong to the summary), so that logs are reproducible across a resume, and so do the
    per-layer fractions at rest (in `neq_history.json`)."""
    items = {}
    for key, value in record.items():
        if key.startswith("per_layer/"):
            kind = key.split("/", 1)[1]
            items.update({f"neq/{kind}/layer_{i}": v for i, v in enumerate(value)})
        elif key in ("step", "epoch", "check", "seconds") or key.startswith("per_layer_at_rest/") or value is None:
            continue
        else:
            items[f"neq/{key}"] = value
    return items


# -- what a saved state belongs to ------------------------------------------------------------------------------------
# Settings that choose the held-out split, named when a resumed run's split differs from the saved one.
# granularity="auto" on a GPU: per-unit freezing from this many parameters, whole layers only below
AUTO_UNIT_MIN_PARAMETERS = 100_000_000
HOLDOUT_SETTINGS = (
    "holdout_size",
    "holdout_seed",
    "holdout_min_samples",
    "holdout_max_samples",
    "holdout_group_by_length",
    "token_pooling",
)


def unit_fingerprint(unit_map: UnitMap, kinds: list[str]) -> dict:
    """The unit map as a saved state must match it: architecture, layer names and unit counts."""
    return {
        "model_type": unit_map.model_type,
        "unit_kinds": list(kinds),
        "layers": [layer.name for layer in unit_map.layers],
        "heads": [layer.num_heads for layer in unit_map.layers],
        "kv_heads": [layer.num_kv_heads for layer in unit_map.layers],
        "head_dim": [layer.head_dim for layer in unit_map.layers],
        "neurons": [layer.num_neurons for layer in unit_map.layers],
    }


def _value_bytes(value) -> bytes:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return repr(value).encode()
    t = t.to(torch.float64 if t.is_floating_point() else torch.int64).contiguous()
    return repr(tuple(t.shape)).encode() + t.numpy().tobytes()


def holdout_fingerprint(dataset: Dataset, input_names: set[str], group_by_length: bool = False) -> dict:
    """Size and hash of the held-out samples' model inputs (labels and other columns ignored), independent of the
    number of processes, and the order in which a check reads them (the reference outputs are stored in it)."""
    digest = hashlib.sha256()
    columns = sorted(k for k in dataset[0] if k in input_names) if len(dataset) else []
    if hasattr(dataset, "column_names"):  # datasets.Dataset: one columnar read per column, not one read per row
        rows = zip(*(dataset[k] for k in columns))
    else:
        rows = ([dataset[i][k] for k in columns] for i in range(len(dataset)))
    for row in rows:
        for k, value in zip(columns, row):
            digest.update(k.encode())
            digest.update(_value_bytes(value))
    order = "length" if group_by_length else "dataset"
    return {"scope": "dataset", "samples": len(dataset), "sha256": digest.hexdigest()[:16], "order": order}


def loader_fingerprint(loader: DataLoader, process_index: int, num_processes: int) -> dict:
    """Hash of the batches of a held-out loader given by the caller (this process's shard)."""
    digest, rows = hashlib.sha256(), 0
    for batch in loader:
        for k in sorted(batch):
            if torch.is_tensor(batch[k]):
                digest.update(k.encode())
                digest.update(_value_bytes(batch[k]))
        rows += next((v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), 0)
    scope = f"loader {process_index}/{num_processes}"
    return {"scope": scope, "samples": rows, "sha256": digest.hexdigest()[:16]}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(saved: dict, now: dict) -> str:
    keys = [k for k in dict.fromkeys(list(saved) + list(now)) if saved.get(k) != now.get(k)]
    return "; ".join(f"{k}: {_short(saved.get(k))} saved, {_short(now.get(k))} now" for k in keys)


def _config_changes(saved: dict, now: dict, names: Optional[tuple] = None) -> str:
    keys = names if names is not None else [k for k in now if k in saved]
    return ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys if k in saved and saved[k] != now.get(k))
