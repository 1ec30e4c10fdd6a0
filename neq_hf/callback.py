"""`NEqTrainerCallback`: NEq freezing inside any `transformers.Trainer` (trl's trainers included).

A thin adapter: the algorithm and its state live in [`NEq`] (`neq_hf/engine.py`); this maps Trainer events to it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

from torch.utils.data import Dataset
from transformers import TrainerCallback
from transformers.data.data_collator import default_data_collator

from .config import NEqConfig
from .distributed import check_engine
from .engine import CONFIG_NAME, HISTORY_NAME, STATE_NAME, NEq  # noqa: F401 (file names re-exported)


class NEqTrainerCallback(TrainerCallback):
    """Watches every attention head and MLP neuron on a held-out split and freezes those at equilibrium.

    Args:
        neq_config ([`NEqConfig`], *optional*): NEq settings; defaults to `NEqConfig()`.
        neq_dataset (`Dataset`, *optional*): the held-out split, tokenized like the training set (labels are
            ignored). Required with a plain `Trainer`: carve one with [`split_holdout`] so that it is removed from
            training. [`NEqTrainer`] carves it for you.
        data_collator (`Callable`, *optional*): collator for the held-out batches; defaults to the one of the
            training dataloader.

    Example:

    ```python
    train, held_out = split_holdout(tokenized_train, size=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.add_callback(NEqTrainerCallback(NEqConfig(eps=1e-3), neq_dataset=held_out))
    trainer.train()
    ```

    With a plain `Trainer`, NEq figures are added to the logs seen by callbacks that run after this one; use
    [`NEqTrainer`] to have every `report_to` backend receive them. The engine is `callback.engine` once training
    has begun.
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
        self.engine: Optional[NEq] = None

    # The engine's parts, as earlier versions exposed them (None before training begins).
    tracker = property(lambda self: self.engine.tracker if self.engine else None)
    freezer = property(lambda self: self.engine.freezer if self.engine else None)
    unit_map = property(lambda self: self.engine.unit_map if self.engine else None)
    check_every = property(lambda self: self.engine.check_every if self.engine else self.config.check_every)
    _model = property(lambda self: self.engine.model if self.engine else None)
    _loader = property(lambda self: self.engine.loader if self.engine else None)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        resuming = state.global_step > 0
        if not resuming or self.engine is None or self.engine.model is not model:
            if self.dataset is None:
                raise ValueError(
                    "NEqTrainerCallback needs a held-out dataset: pass neq_dataset=..., e.g. "
                    "`train, held_out = neq_hf.split_holdout(train_dataset, size=0.01)`, or use NEqTrainer, which "
                    "carves one from train_dataset."
                )
            check_engine(args, model)  # refuses engines under which frozen units would still train
            self.engine = NEq(
                model,
                self.config,
                self.dataset,
                data_collator=self.data_collator
                or getattr(train_dataloader, "collate_fn", None)
                or default_data_collator,
                batch_size=args.per_device_eval_batch_size,
                process_index=args.process_index,
                num_processes=args.world_size,
                verify_engine=False,
            )
        if resuming:
            folder = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.engine.load_checkpoint(folder)
        num_epochs = int(args.num_train_epochs) if args.max_steps <= 0 else None
        self.engine.setup(max_steps=state.max_steps, num_epochs=num_epochs)  # reference check unless resumed
        return control

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is not None and optimizer is not None:
            self.engine.before_optimizer_step(optimizer)
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is not None and optimizer is not None:
            self.engine.after_optimizer_step(optimizer)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.engine.step_end(state.global_step, state.epoch) is not None:
            control.should_log = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.engine.epoch_end(state.global_step, state.epoch) is not None:
            control.should_log = True
        return control

    def run_check(self, state) -> dict:
        """Run one held-out check now and apply its decisions."""
        return self.engine.run_check(state.global_step, state.epoch)

    def pop_logs(self) -> dict[str, float]:
        """NEq figures of the latest check not logged yet (used by `NEqTrainer.log`)."""
        return self.engine.pop_logs() if self.engine is not None else {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Reached only with a plain Trainer (NEqTrainer.log drains the figures first).
        pending = self.pop_logs()
        if pending and logs is not None:
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is None:
            return control
        self.engine.close()
        if args.process_index == 0:
            self.engine.save_history(args.output_dir)
        return control

    def summary(self) -> dict:
        """Final and average frozen fractions (overall, per kind, per layer) and what the checks cost."""
        return self.engine.summary() if self.engine is not None else {}
