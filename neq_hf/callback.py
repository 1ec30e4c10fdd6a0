"""`NEqTrainerCallback`: NEq freezing inside any `transformers.Trainer` (trl's trainers included).

A thin adapter: the algorithm and its state live in [`NEq`] (`neq_hf/engine.py`); this maps Trainer events to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Optional

from torch.utils.data import Dataset
from transformers import TrainerCallback
from transformers.data.data_collator import default_data_collator

from .config import NEqConfig
from .distributed import check_engine
from .engine import CONFIG_NAME, HISTORY_NAME, STATE_NAME, NEq, resolve_schedule  # noqa: F401
from .holdout import _INPUT_COLUMNS

logger = logging.getLogger(__name__)

# Training rows read to look for held-out samples in the training set, and the estimated share of the held-out split
# found there from which NEq warns (a few exact duplicates are common in real corpora).
OVERLAP_SCAN_ROWS = 10_000
OVERLAP_WARN_FRACTION = 0.05


class NEqTrainerCallback(TrainerCallback):
    """Watches every attention head and MLP neuron on a held-out split and freezes those at equilibrium.

    Args:
        neq_config ([`NEqConfig`], *optional*): NEq settings; defaults to `NEqConfig()`.
        neq_dataset (`Dataset`, *optional*): the held-out split, tokenized like the training set (labels are
            ignored). Required with a plain `Trainer`: carve one with [`split_holdout`] (and train on the whole set,
            as [`NEqTrainer`] does by default, or on the rest it returns). [`NEqTrainer`] carves it for you.
        data_collator (`Callable`, *optional*): collator for the held-out batches; defaults to the one of the
            training dataloader.

    Example:

    ```python
    train, held_out = split_holdout(tokenized_train, size=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.add_callback(NEqTrainerCallback(NEqConfig(eps=1e-3), neq_dataset=held_out))
    trainer.train()
    ```

    NEq figures of each check go to `trainer.state.log_history` as entries of their own (``neq/...`` keys), which
    leave the Trainer's `logging_steps` and loss windows as they are; with [`NEqTrainer`] they go through
    `Trainer.log`, so every `report_to` backend receives them too. The engine is `callback.engine` once training has
    begun.

    One callback may serve several Trainers: each model's run keeps its own engine (`summary(model)`). A run that
    ended without `on_train_end` (an exception) is undone when the next run of that model begins, or by [`close`].
    """

    def __init__(
        self,
        neq_config: Optional[NEqConfig] = None,
        neq_dataset: Optional[Dataset] = None,
        data_collator: Optional[Callable] = None,
    ):
        self.config = neq_config if neq_config is not None else NEqConfig()
        if not isinstance(self.config, NEqConfig):
            raise TypeError(f"neq_config must be a NEqConfig, got {type(self.config).__name__}.")
        self.dataset = neq_dataset
        self.data_collator = data_collator
        self.resume_from_checkpoint: Optional[str] = None
        # Set by NEqTrainer for its next run: why NEq cannot act in it (None: it can), whether to look for held-out
        # samples in the training set, and its `log` (NEq entries then reach every report_to backend).
        self.skip_reason: Optional[str] = None
        self.check_overlap = True
        self.log_function: Optional[Callable[[dict], None]] = None
        self._runs: dict[int, NEq] = {}  # id(model) -> the engine of that model's latest run
        self.engine: Optional[NEq] = None  # the latest run's engine
        self._warned: set[str] = set()

    # The engine's parts, as earlier versions exposed them (None before training begins).
    tracker = property(lambda self: self.engine.tracker if self.engine else None)
    freezer = property(lambda self: self.engine.freezer if self.engine else None)
    unit_map = property(lambda self: self.engine.unit_map if self.engine else None)
    check_every = property(lambda self: self.engine.check_every if self.engine else self.config.check_every)
    _model = property(lambda self: self.engine.model if self.engine else None)
    _loader = property(lambda self: self.engine.loader if self.engine else None)

    def _engine(self, model) -> Optional[NEq]:
        """The engine of ``model``'s run (events carry the Trainer's model), else the latest run's."""
        return self.engine if model is None else self._runs.get(id(model))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        stale = self._runs.pop(id(model), None)
        if stale is not None:
            stale.close()  # an earlier run of this model (interrupted: no on_train_end) must not stay applied
        reason, self.skip_reason = self.skip_reason, None
        num_epochs = int(args.num_train_epochs) if args.max_steps <= 0 else None
        if reason is None:
            try:
                resolve_schedule(self.config, state.max_steps, num_epochs)
            except ValueError as err:
                reason = str(err)
        if reason is not None:
            self._cannot_act(reason)
            self.engine = None
            return control
        if self.dataset is None:
            raise ValueError(
                "NEqTrainerCallback needs a held-out dataset: pass neq_dataset=..., e.g. "
                "`train, held_out = neq_hf.split_holdout(train_dataset, size=0.01)`, or use NEqTrainer, which "
                "carves one from train_dataset."
            )
        check_engine(args, model)  # refuses engines under which frozen units would still train
        engine = NEq(
            model,
            self.config,
            self.dataset,
            data_collator=self.data_collator or getattr(train_dataloader, "collate_fn", None) or default_data_collator,
            batch_size=args.per_device_eval_batch_size,
            process_index=args.process_index,
            num_processes=args.world_size,
            verify_engine=False,
        )
        if self.check_overlap:
            warn_if_trained_on(getattr(train_dataloader, "dataset", None), self.dataset)
        self._runs[id(model)] = self.engine = engine
        if state.global_step > 0:  # resuming
            folder = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            engine.load_checkpoint(folder)
        engine.setup(  # the reference check unless resumed
            max_steps=state.max_steps,
            num_epochs=num_epochs,
            samples_per_step=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        )
        return control

    def _cannot_act(self, reason: str) -> None:
        if self.config.strict:
            raise ValueError(f"NEq cannot act in this run: {reason} (NEqConfig.strict=True makes this an error.)")
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(
                "NEq is off for this run: %s Training proceeds exactly as with a plain Trainer; "
                "NEqConfig(strict=True) makes this an error.",
                reason,
            )

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        engine = self._engine(model)
        if engine is not None and optimizer is not None:
            engine.before_optimizer_step(optimizer)
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        engine = self._engine(model)
        if engine is not None and optimizer is not None:
            engine.after_optimizer_step(optimizer)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine = self._engine(model)
        if engine is not None:
            engine.step_end(state.global_step, state.epoch)
            self._emit(engine, state, control)
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        engine = self._engine(model)
        if engine is not None:
            engine.epoch_end(state.global_step, state.epoch)
            self._emit(engine, state, control)
        return control

    def _emit(self, engine: NEq, state, control) -> None:
        """Log the figures of a check (and guard-rail warnings) as an entry of their own: no log is forced, so
        `logging_steps` and the Trainer's loss window stay as they are."""
        logs = engine.pop_logs()
        if not logs:
            return
        if self.log_function is not None:
            should_log = control.should_log  # the Trainer's on_log clears it: this step's regular log must stay due
            self.log_function(logs)
            control.should_log = should_log
            return
        entry = dict(logs)
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})

    def run_check(self, state) -> dict:
        """Run one held-out check now and apply its decisions."""
        return self.engine.run_check(state.global_step, state.epoch)

    def pop_logs(self) -> dict[str, float]:
        """NEq figures of the latest check not logged yet."""
        return self.engine.pop_logs() if self.engine is not None else {}

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        engine = self._engine(model)
        if engine is not None and logs and "loss" in logs:
            engine.observe_loss(state.global_step, logs["loss"])  # for the collapse warning
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        engine = self._engine(model)
        if engine is not None:
            engine.save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        engine = self._engine(model)
        if engine is None:
            return control
        engine.close()
        if args.process_index == 0:
            engine.save_history(args.output_dir)
        return control

    def close(self, model=None) -> None:
        """Release the model of every run (or of ``model``'s): every parameter trainable again, dense forward, no
        backward stop. Idempotent; `NEqTrainer.train` calls it on any exit, exceptions included."""
        engines = list(self._runs.values()) if model is None else [self._runs.get(id(model))]
        for engine in engines:
            if engine is not None:
                engine.close()

    def summary(self, model=None) -> dict:
        """Final and average frozen fractions (overall, per kind, per layer) and what the checks cost, of the latest
        run, or of ``model``'s latest run when one callback serves several Trainers."""
        engine = self._engine(model)
        return engine.summary() if engine is not None else {}


def _input_column(row: dict) -> Optional[str]:
    return next((c for c in _INPUT_COLUMNS if c in row), None)


def _rows(dataset, indices: list[int], column: str) -> list:
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):  # datasets.Dataset: one columnar read
        return dataset.select(indices)[column]
    return [dataset[i][column] for i in indices]


def _key(value):
    """A hashable copy of a sample's input (token ids as nested tuples)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value) if value and isinstance(value[0], (list, tuple)) else tuple(value)
    return value


def shared_fraction(train_dataset, held_out) -> Optional[float]:
    """Estimated share of the held-out samples that are also training samples (same model inputs), from up to
    ``OVERLAP_SCAN_ROWS`` evenly spaced training rows; `None` when it cannot be told (no length, no input column)."""
    if train_dataset is None or held_out is None:
        return None
    if not (hasattr(train_dataset, "__len__") and hasattr(held_out, "__len__")) or not len(held_out):
        return None
    n_train = len(train_dataset)
    if n_train == 0:
        return None
    first, first_train = held_out[0], train_dataset[0]
    if not isinstance(first, dict) or not isinstance(first_train, dict):
        return None
    column = _input_column(first)
    if column is None or column not in first_train:
        return None
    held = {_key(v) for v in _rows(held_out, list(range(len(held_out))), column)}
    step = max(1, n_train // OVERLAP_SCAN_ROWS)
    indices = list(range(0, n_train, step))
    shared = len(held.intersection(_key(v) for v in _rows(train_dataset, indices, column)))
    return min(1.0, shared * (n_train / len(indices)) / len(held))


def warn_if_trained_on(train_dataset, held_out) -> None:
    """Say when the held-out split is the training set itself (a warning: every check then runs over the whole
    training set) or shares samples with it (information: allowed, as `NEqConfig.holdout_in_train` does)."""
    if train_dataset is not None and train_dataset is held_out:
        logger.warning(
            "NEq: the held-out split (neq_dataset) is the training set itself (%s samples): every check runs a "
            "forward pass over all of it. A few hundred samples measure equilibrium as well (see "
            "NEqConfig.holdout_min_samples): pass `neq_hf.split_holdout(train_dataset, size=0.01)[1]`, or let "
            "NEqTrainer carve one (leave neq_dataset unset).",
            f"{len(held_out):,}" if hasattr(held_out, "__len__") else "all its",
        )
        return
    fraction = shared_fraction(train_dataset, held_out)
    if fraction is None or fraction < OVERLAP_WARN_FRACTION:
        return
    logger.info(
        "NEq: about %.0f%% of the held-out samples (neq_dataset) are also trained on, as with "
        "NEqConfig.holdout_in_train=True (NEqTrainer's default carve). To measure equilibrium on unseen samples "
        "instead, carve the split with `train, held_out = neq_hf.split_holdout(train_dataset, size=0.01)`, which "
        "removes it from training.",
        100 * fraction,
    )
