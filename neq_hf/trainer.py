"""`NEqTrainer`: a drop-in `transformers.Trainer` with NEq freezing."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import Dataset
from transformers import Trainer

from .callback import NEqTrainerCallback
from .config import NEqConfig
from .holdout import split_holdout


class NEqTrainer(Trainer):
    """`Trainer` that freezes attention heads and MLP neurons at equilibrium (NEq).

    Takes the same arguments as [`~transformers.Trainer`], plus:

    Args:
        neq_config ([`NEqConfig`], *optional*): NEq settings; defaults to `NEqConfig()`.
        neq_dataset (`Dataset`, *optional*): the held-out split (model inputs; labels are ignored). When not given,
            `neq_config.holdout_size` samples are carved deterministically from `train_dataset` and removed from it.
        peft_config (`peft.PeftConfig`, *optional*): wrap the model with this adapter config first (NEq then freezes
            adapter rows of frozen units).
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
        self.neq_config = neq_config if neq_config is not None else NEqConfig()
        if neq_dataset is None:
            if self.train_dataset is None:
                raise ValueError(
                    "NEqTrainer needs a train_dataset (or an explicit neq_dataset) to carve a held-out split."
                )
            cfg = self.neq_config
            self.train_dataset, neq_dataset = split_holdout(
                self.train_dataset,
                cfg.holdout_size,
                cfg.holdout_seed,
                cfg.holdout_min_samples,
                cfg.holdout_max_samples,
            )
        self.neq_dataset = neq_dataset
        self.neq_callback = NEqTrainerCallback(self.neq_config, neq_dataset, data_collator=self.data_collator)
        self.add_callback(self.neq_callback)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.neq_callback.resume_from_checkpoint = (
            resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Merge NEq figures here so every `report_to` backend receives them with the Trainer's own logs.
        logs = {**logs, **self.neq_callback.pop_logs()}
        super().log(logs, *args, **kwargs)

    def neq_summary(self) -> dict:
        """Frozen fractions (final and average, per kind and layer) and the cost of the held-out checks."""
        return self.neq_callback.summary()

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
