"""`NEqTrainerCallback`: NEq freezing inside any `transformers.Trainer` (trl's trainers included)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainerState, TrainingArguments
from transformers.data.data_collator import default_data_collator

from .config import NEqConfig
from .distributed import check_engine, reduce_device
from .freezing import Freezer
from .holdout import OutputRecorder, build_holdout_loader
from .tracker import EquilibriumTracker
from .units import UnitMap, discover_units

logger = logging.getLogger(__name__)

STATE_NAME = "neq_state_rank{rank}.pt"
CONFIG_NAME = "neq_config.json"
HISTORY_NAME = "neq_history.json"
AUTO_CHECKS = 10


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
    [`NEqTrainer`] to have every `report_to` backend receive them.
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
        self.check_every = self.config.check_every  # resolved at train start ("auto" -> a number of steps)
        self.unit_map: Optional[UnitMap] = None
        self.freezer: Optional[Freezer] = None
        self.tracker: Optional[EquilibriumTracker] = None
        self._model = None
        self._loader = None
        self._recorder = None
        self._pending: dict[str, float] = {}
        self.check_seconds = 0.0
        self.train_seconds = 0.0
        self._train_start = None
        self._args = None

    # -- setup ----------------------------------------------------------------------------------------------------
    def _setup(self, args: TrainingArguments, state: TrainerState, model, train_dataloader) -> None:
        if self.dataset is None:
            raise ValueError(
                "NEqTrainerCallback needs a held-out dataset: pass neq_dataset=..., e.g. "
                "`train, held_out = neq_hf.split_holdout(train_dataset, size=0.01)`, or use NEqTrainer, which "
                "carves one from train_dataset."
            )
        self._check_schedule(args, state)
        check_engine(args, model)  # refuses engines under which frozen units would still train
        collator = self.data_collator or getattr(train_dataloader, "collate_fn", None) or default_data_collator
        batch_size = self.config.holdout_batch_size or args.per_device_eval_batch_size
        self._loader = build_holdout_loader(
            self.dataset, model, collator, batch_size, args.process_index, args.world_size
        )
        self._model = model
        self.unit_map = discover_units(model)
        self.freezer = Freezer(
            model,
            self.unit_map,
            freeze_embeddings=self.config.freeze_embeddings,
            row_sparse_min_frozen=self.config.row_sparse_min_frozen,
        )
        self.tracker = EquilibriumTracker(self.unit_map, self.config)
        self._recorder = OutputRecorder(self.unit_map, self.config.unit_kinds)
        first = next(iter(self._loader))
        device = self._device()
        self.freezer.locate_embeddings(model, lambda: self._forward_once(first, device))

    def _check_schedule(self, args: TrainingArguments, state: TrainerState) -> None:
        every = self.config.check_every
        if every == "auto":
            # 10 checks per run: every 10% of the optimizer steps.
            every = max(1, round(state.max_steps / AUTO_CHECKS)) if state.max_steps > 0 else "epoch"
        self.check_every = every
        if every == "epoch":
            n_checks = int(args.num_train_epochs) if args.max_steps <= 0 else None
            what = f"num_train_epochs={args.num_train_epochs}"
        else:
            n_checks = state.max_steps // every
            what = f"max_steps={state.max_steps}"
        needed = self.config.warmup + 1
        if n_checks is not None and n_checks < needed:
            raise ValueError(
                f"NEqConfig.check_every={self.config.check_every!r} leaves {n_checks} held-out check(s) in this run ({what}), but a "
                f"decision needs {needed} (warmup={self.config.warmup} + 1): NEq would never freeze anything. Use a "
                f"smaller number of steps, e.g. check_every={max(1, state.max_steps // (needed + 2))}."
            )

    def _device(self) -> torch.device:
        return next(self._model.parameters()).device

    @torch.no_grad()
    def _forward_once(self, batch, device) -> None:
        was_training = self._model.training
        self._model.eval()
        try:
            self._model(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        finally:
            self._model.train(was_training)

    # -- checks ---------------------------------------------------------------------------------------------------
    def _all_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return flat
        buf = flat.to(reduce_device(self._device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()

    def run_check(self, state: TrainerState) -> dict:
        """Run one held-out check now and apply its decisions."""
        start = time.perf_counter()
        device = self._device()

        def run_pass(on_batch):
            self._recorder.run(self._model, self._loader, device, on_batch)

        figures = self.tracker.check(run_pass, self._all_reduce)
        self.freezer.apply(self.tracker.unit_active())
        elapsed = time.perf_counter() - start
        self.check_seconds += elapsed
        if figures["nonfinite_units"]:
            logger.warning(
                "NEq: %d unit(s) had non-finite outputs on the held-out split at step %d; they are kept trainable.",
                figures["nonfinite_units"],
                state.global_step,
            )
        record = {"step": state.global_step, "epoch": state.epoch, "seconds": elapsed, **figures}
        record["trainable_parameters"] = self.freezer.trainable_parameters()
        record["backward_stops_at_layer"] = self.freezer.stop_layer
        self.tracker.history.append(record)
        if record["check"] > 0:
            self._pending = self._log_items(record)
        return record

    @staticmethod
    def _log_items(record: dict) -> dict[str, float]:
        items = {}
        for key, value in record.items():
            if key.startswith("per_layer/"):
                kind = key.split("/", 1)[1]
                items.update({f"neq/{kind}/layer_{i}": v for i, v in enumerate(value)})
            elif key in ("step", "epoch", "check") or value is None:
                continue
            else:
                items[f"neq/{key}"] = value
        return items

    def pop_logs(self) -> dict[str, float]:
        """NEq figures of the latest check not logged yet (used by `NEqTrainer.log`)."""
        pending, self._pending = self._pending, {}
        return pending

    # -- TrainerCallback events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._args = args
        self._train_start = time.perf_counter()
        resuming = state.global_step > 0
        if not resuming or self._model is not model or self.tracker is None:
            self._setup(args, state, model, train_dataloader)
        if resuming and self._load(args, state):
            self.freezer.apply(self.tracker.unit_active())
        else:
            self.run_check(state)  # the reference outputs (check 0)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        every = self.check_every
        if every != "epoch" and state.global_step % every == 0:
            self.run_check(state)
            control.should_log = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.check_every == "epoch":
            self.run_check(state)
            control.should_log = True
        return control

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.freezer is not None and optimizer is not None:
            self.freezer.before_optimizer_step(optimizer)
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.freezer is not None and optimizer is not None:
            self.freezer.after_optimizer_step(optimizer)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Reached only with a plain Trainer (NEqTrainer.log drains the figures first).
        pending = self.pop_logs()
        if pending and logs is not None:
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.tracker is None:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.tracker.state_dict(), os.path.join(folder, STATE_NAME.format(rank=args.process_index)))
        if args.process_index == 0:
            with open(os.path.join(folder, CONFIG_NAME), "w") as f:
                f.write(self.config.to_json_string())
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._train_start is not None:
            self.train_seconds += time.perf_counter() - self._train_start
            self._train_start = None
        if self.tracker is not None and args.process_index == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, HISTORY_NAME), "w") as f:
                json.dump(
                    {"config": self.config.to_dict(), "summary": self.summary(), "checks": self.tracker.history},
                    f,
                    indent=1,
                )
        if self.freezer is not None:
            self.freezer.release()
        return control

    # -- checkpoint state -----------------------------------------------------------------------------------------
    def _load(self, args: TrainingArguments, state: TrainerState) -> bool:
        folder = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_NAME.format(rank=args.process_index))
        if not os.path.isfile(path):
            logger.warning(
                "Resuming at step %d without NEq state (%s not found): NEq starts over with a new reference check.",
                state.global_step,
                path,
            )
            return False
        self.tracker.load_state_dict(torch.load(path, map_location="cpu", weights_only=False), self._device())
        return True

    # -- results --------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Final and average frozen fractions (overall, per kind, per layer) and what the checks cost."""
        if self.tracker is None:
            return {}
        checks = [h for h in self.tracker.history if h["check"] > 0]
        kinds = self.config.unit_kinds
        out = {
            "units": self.unit_map.summary(),
            "checks": len(checks),
            "check_every": self.check_every,
            "check_seconds": self.check_seconds,
            "train_seconds": self.train_seconds,
            "check_time_fraction": self.check_seconds / self.train_seconds if self.train_seconds else None,
            "reference_megabytes": self.tracker.reference_bytes() / 2**20,
        }
        if not checks:
            return out
        last = checks[-1]
        out["final_trainable_parameters"] = last["trainable_parameters"]
        out["final_frozen_fraction"] = last["frozen_fraction"]
        out["average_frozen_fraction"] = sum(h["frozen_fraction"] for h in checks) / len(checks)
        for kind in kinds:
            out[f"final_frozen_fraction/{kind}"] = last[f"frozen_fraction/{kind}"]
            out[f"average_frozen_fraction/{kind}"] = sum(h[f"frozen_fraction/{kind}"] for h in checks) / len(checks)
            out[f"final_per_layer/{kind}"] = last[f"per_layer/{kind}"]
            layers = len(last[f"per_layer/{kind}"])
            out[f"average_per_layer/{kind}"] = [
                sum(h[f"per_layer/{kind}"][i] for h in checks) / len(checks) for i in range(layers)
            ]
        return out
