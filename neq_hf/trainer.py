"""`NEqTrainer`: a drop-in `transformers.Trainer` with NEq freezing."""

from __future__ import annotations

import math
from typing import Optional

from torch.utils.data import Dataset
from transformers import Trainer
from transformers.trainer_utils import has_length

from .callback import NEqTrainerCallback, warn_if_trained_on
from .config import NEqConfig
from .engine import resolve_schedule
from .holdout import split_holdout


class NEqTrainer(Trainer):
    """`Trainer` that freezes attention heads and MLP neurons at equilibrium (NEq).

    Takes the same arguments as [`~transformers.Trainer`], plus:

    Args:
        neq_config ([`NEqConfig`], *optional*): NEq settings; defaults to `NEqConfig()`.
        neq_dataset (`Dataset`, *optional*): the held-out split (model inputs; labels are ignored). When not given,
            `neq_config.holdout_size` samples are carved deterministically from `train_dataset` (at construction, or
            at `train()` when the training set comes later); they stay in it with `neq_config.holdout_in_train`
            (the default) and are removed from it otherwise.
        peft_config (`peft.PeftConfig`, *optional*): wrap the model with this adapter config first (NEq then freezes
            adapter rows of frozen units).

    Whatever `Trainer` accepts, `NEqTrainer` accepts: without a training set (evaluation or prediction only) NEq
    stays idle. Where NEq cannot act in a run (a training set with no room for a held-out split, a run too short for
    two checks) it says so once in a warning and the run is exactly a `Trainer` run (every training sample, no
    freezing); `NEqConfig(strict=True)` makes that an error. However `train()` ends (exceptions and
    `KeyboardInterrupt` included), the model is left unfrozen and unpatched.
    """

    _tag_names = ["neq"]

    def __init__(
        self,
        model=None,
        args=None,
        *trainer_args,
        neq_config: Optional[NEqConfig] = None,
        neq_dataset: Optional[Dataset] = None,
        peft_config=None,
        **kwargs,
    ):
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        super().__init__(model, args, *trainer_args, **kwargs)
        if any(isinstance(cb, NEqTrainerCallback) for cb in self.callback_handler.callbacks):
            raise ValueError(
                "NEqTrainer adds its own NEqTrainerCallback: remove the one given in callbacks=... and pass its "
                "settings as NEqTrainer(neq_config=..., neq_dataset=...), or use it with a plain Trainer."
            )
        self.neq_config = neq_config if neq_config is not None else NEqConfig()
        self.neq_dataset = neq_dataset
        self.neq_callback = NEqTrainerCallback(self.neq_config, neq_dataset, data_collator=self.data_collator)
        self.neq_callback.log_function = self.log  # NEq entries reach every report_to backend
        self.add_callback(self.neq_callback)
        self._neq_explicit = neq_dataset is not None
        self._neq_source: Optional[Dataset] = None  # the training set as given, before the carve
        self._neq_carved: Optional[Dataset] = None  # the training set without the held-out split
        self._neq_skip: Optional[str] = None  # why NEq cannot act with this training set
        if self._neq_explicit and neq_dataset is self.train_dataset:
            warn_if_trained_on(self.train_dataset, neq_dataset)
            self.neq_callback.check_overlap = False  # said once
        self._neq_carve()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def _neq_carve(self) -> None:
        """Carve the held-out split from a training set not seen yet (unless one was given)."""
        train = self.train_dataset
        if train is None or self._neq_explicit or train is self._neq_source or train is self._neq_carved:
            return
        self._neq_source, self._neq_carved, self._neq_skip = train, None, None
        cfg = self.neq_config
        if not has_length(train):
            self._neq_skip = (
                "NEq cannot carve a held-out split from a training set without a length (an iterable dataset). "
                "Pass neq_dataset=... explicitly."
            )
        else:
            try:
                carved, held = split_holdout(
                    train, cfg.holdout_size, cfg.holdout_seed, cfg.holdout_min_samples, cfg.holdout_max_samples
                )
            except ValueError as err:
                if not isinstance(cfg.holdout_size, float):
                    raise  # an explicit sample count that this training set cannot give
                self._neq_skip = (
                    f"the training set ({len(train)} samples) has no room for a held-out split of at least 2 samples "
                    f"({err}) Use a larger training set, or pass neq_dataset=... explicitly."
                )
            else:
                # holdout_in_train: the probes stay in the training set, which stays the one given
                self._neq_carved = self.train_dataset = train if cfg.holdout_in_train else carved
                self.neq_dataset = self.neq_callback.dataset = held
                self.neq_callback.check_overlap = False  # carved by NEq: disjoint, or kept in train on purpose
        if self._neq_skip is not None and cfg.strict:
            raise ValueError(f"NEq cannot act with this training set: {self._neq_skip} (NEqConfig.strict=True)")

    def _neq_schedule_problem(self) -> Optional[str]:
        """Why the coming run is too short for NEq's checks, predicted from the arguments and the training set
        (the callback checks again with the Trainer's own step count)."""
        args = self.args
        num_epochs = None
        if args.max_steps > 0:
            max_steps = args.max_steps
        else:
            train = self.train_dataset
            if train is None or not has_length(train):
                return None
            per_step = self._train_batch_size * max(1, args.world_size)
            batches = len(train) // per_step if args.dataloader_drop_last else math.ceil(len(train) / per_step)
            accumulation = args.gradient_accumulation_steps
            updates = max(batches // accumulation + int(batches % accumulation > 0), 1)
            max_steps, num_epochs = math.ceil(args.num_train_epochs * updates), int(args.num_train_epochs)
        try:
            resolve_schedule(self.neq_config, max_steps, num_epochs)
        except ValueError as err:
            return str(err)
        return None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._neq_carve()
        if self._neq_carved is not None:
            self.train_dataset = self._neq_carved
        reason = self._neq_skip or (self._neq_schedule_problem() if self.train_dataset is not None else None)
        if reason is not None and self._neq_source is not None:
            self.train_dataset = self._neq_source  # NEq is off: every training sample, as with Trainer
        self.neq_callback.skip_reason = reason
        self.neq_callback.resume_from_checkpoint = (
            resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            # Whatever ended the run (an exception, KeyboardInterrupt), the model must not stay frozen or patched.
            self.neq_callback.skip_reason = None
            self.neq_callback.close()

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        engine = self.neq_callback.engine
        if engine is not None:
            engine.record_step_loss(loss)  # every step's loss for NEqConfig.min_loss_drop (read at the next check)
        return loss

    @property
    def neq_holdout_in_train(self) -> bool:
        """Whether the held-out split was carved from the training set and kept in it (`NEqConfig.holdout_in_train`)."""
        return self._neq_carved is not None and self._neq_carved is self._neq_source

    def neq_summary(self) -> dict:
        """Frozen fractions (final and average, per kind and layer) and the cost of the held-out checks."""
        summary = self.neq_callback.summary()
        if summary and self._neq_carved is not None:
            summary["holdout_in_train"] = self.neq_holdout_in_train
        return summary

    def create_model_card(
        self, *args, neq_time_ratio: Optional[float] = None, neq_results: Optional[dict] = None, **kwargs
    ) -> None:
        """Write the Trainer's model card, then add the NEq tags, metadata and section (rank 0 only, idempotent).

        Takes the arguments of [`~transformers.Trainer.create_model_card`], plus:

        Args:
            neq_time_ratio (`float`, *optional*): measured training time of this run over that of a baseline run.
            neq_results (`dict`, *optional*): results of the run (e.g. `examples/glue.py`'s `results.json`):
                `metrics` with `dataset`, `dataset_config`, `dataset_split` fill the model-index; `time_ratio` and
                `time_ratio_baseline` are used when `neq_time_ratio` is not given.
        """
        if not self.is_world_process_zero():
            return
        import inspect

        from .model_card import model_card_tags, update_trainer_model_card

        arguments = inspect.signature(super().create_model_card).bind(*args, **kwargs).arguments
        arguments["tags"] = model_card_tags(self.model, arguments.get("tags"))
        super().create_model_card(**arguments)
        update_trainer_model_card(self, arguments, time_ratio=neq_time_ratio, results=neq_results)
