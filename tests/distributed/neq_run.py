"""One NEq training run on a tiny random model, launched by `torchrun` (or plainly, as one process).

Besides training, a probe callback checks what must hold on every process at every NEq check, and writes what the
tests compare to ``<out>/rank<r>.json``:

- the frozen masks are the same on every process (sha256 of the masks gathered across ranks);
- every parameter slice that was frozen at the previous check is bit-identical now;
- all parameters are identical across processes (DDP keeps replicas in sync).

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/distributed/neq_run.py --out DIR [options]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny models and datasets of conftest.py

from conftest import pad_collator, tiny_classifier, token_dataset, training_args  # noqa: E402

from neq_hf import NEqConfig, NEqTrainer  # noqa: E402
from neq_hf.distributed import assert_same_masks, detect_engine, gather_strings, tensor_digest  # noqa: E402

HOLDOUT_SEED = 1234


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="bert", choices=["bert", "llama"])
    p.add_argument("--max_steps", type=int, default=16)
    p.add_argument("--check_every", type=int, default=4)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_loss_drop", type=float, default=0.0, help="NEqConfig.min_loss_drop (0: no gate)")
    p.add_argument(
        "--checks_from_loss_drop", type=float, default=0.0, help="NEqConfig.checks_from_loss_drop (0: from step 0)"
    )
    p.add_argument(
        "--settle_fraction", type=float, default=0.0, help="NEqConfig.settle_fraction (0: no movement gate)"
    )
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--train_samples", type=int, default=160)
    p.add_argument("--holdout_samples", type=int, default=24)
    p.add_argument("--holdout_batch_size", type=int, default=5)
    p.add_argument("--dropout", type=float, default=None, help="override hidden/attention dropout")
    p.add_argument("--save_steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--ddp_find_unused_parameters", default=None, choices=["true", "false"])
    p.add_argument("--fsdp", type=int, default=0, help="1 or 2: run under FSDP through the Trainer")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="read training data in order: N processes x batch B then see the same samples per step as 1 x N*B",
    )
    return p.parse_args(argv)


def build_model(name: str, dropout):
    overrides = {}
    if dropout is not None:
        overrides = (
            {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
            if name == "bert"
            else {"attention_dropout": dropout}
        )
    model = tiny_classifier(name)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    if overrides:  # dropout modules read their rate at construction: rebuild with the same seed
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(model.config)
    return model


def datasets(args):
    """Training set and held-out split, the same whatever the number of processes."""
    train = token_dataset(args.train_samples, seed=0)
    held_out = token_dataset(args.holdout_samples, seed=HOLDOUT_SEED, with_labels=False)
    return train, held_out


def frozen_parts(callback) -> list[tuple[str, torch.Tensor, int, torch.Tensor | None]]:
    """``(name, parameter, dim, index)`` of every parameter slice that the current masks freeze (``index=None``: the
    whole tensor), derived from the masks and the unit map rather than from the freezer's own bookkeeping."""
    active = callback.tracker.unit_active()
    names = {id(p): n for n, p in callback._model.named_parameters()}
    parts, partly = [], set()
    for layer in callback.unit_map.layers:
        layer_active = {
            kind: active.get((layer.index, kind), torch.ones(layer.num_units(kind), dtype=torch.bool))
            for kind in ("heads", "neurons")
        }
        for b in layer.bindings:
            frozen = (~b.feature_active(layer_active[b.kind])).nonzero().flatten()
            if 0 < frozen.numel() < b.feature_units.shape[0]:
                parts.append((names[id(b.weight)], b.weight, b.weight_dim(), frozen))
                partly.add(id(b.weight))
                if b.bias is not None:
                    parts.append((names[id(b.bias)], b.bias, 0, frozen))
                    partly.add(id(b.bias))
    # Tensors switched off as a whole: fully frozen weights, norms and biases of frozen layers, embeddings.
    for pid, p in callback.freezer.managed.items():
        if not p.requires_grad and pid not in partly:
            parts.append((names[pid], p, 0, None))
    return parts


def read(parts) -> list[torch.Tensor]:
    return [(p.detach() if idx is None else p.detach().index_select(dim, idx)).clone() for _, p, dim, idx in parts]


class Probe(TrainerCallback):
    """Runs after `NEqTrainerCallback`: at every check, verifies and records what the tests compare."""

    def __init__(self, neq_callback, out_dir: str):
        self.neq = neq_callback
        self.out_dir = out_dir
        self.records: list[dict] = []
        self.checks_seen = 0  # records of the tracker's history already seen
        self.violations: list[str] = []
        self.parts: list = []
        self.values: list[torch.Tensor] = []
        self.frozen_elements = 0  # parameter elements checked for being unchanged, summed over checks

    def _after_check(self, state) -> None:
        cb, tracker = self.neq, self.neq.tracker
        if len(tracker.history) == self.checks_seen:
            return  # no check was due, or the checks wait for the loss (NEqConfig.checks_from_loss_drop)
        self.checks_seen = len(tracker.history)
        # 1. Whatever the previous check froze is bit-identical now.
        for (name, *_), before, after in zip(self.parts, self.values, read(self.parts)):
            self.frozen_elements += before.numel()
            if not torch.equal(before, after):
                diff = (before.float() - after.float()).abs().max().item()
                self.violations.append(f"step {state.global_step}: {name} moved by {diff:.3g} while frozen")
        # 2. Same masks and same parameters on every process.
        digest = assert_same_masks(tracker.frozen)
        params_digest = tensor_digest(cb._model.named_parameters())
        if len(set(gather_strings(params_digest))) != 1:
            self.violations.append(f"step {state.global_step}: parameters differ across processes")
        last = tracker.history[-1]
        self.records.append(
            {
                "step": state.global_step,
                "check": last["check"],
                "digest": digest,
                "params_digest": params_digest,
                "frozen_fraction": last["frozen_fraction"],
                "held": last.get("held"),
                "settled": last.get("settled"),
                "loss_start": tracker.loss_start,
                "gate_step": tracker.gate_step,
                "stop_layer": cb.freezer.stop_layer,
                "trainable_parameters": cb.freezer.trainable_parameters(),
                "phi": {f"{k[0]}/{k[1]}": tracker.phi[k].tolist() for k in tracker.keys},
                "v": {f"{k[0]}/{k[1]}": tracker.v[k].tolist() for k in tracker.keys},
                "frozen": {f"{k[0]}/{k[1]}": tracker.frozen[k].int().tolist() for k in tracker.keys},
            }
        )
        self.parts = frozen_parts(cb)
        self.values = read(self.parts)

    def on_train_begin(self, args, state, control, **kwargs):
        self._after_check(state)  # the reference check, or the state restored from a checkpoint
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.neq.config.check_every == 0:
            self._after_check(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # The freezer released everything just before; values frozen at the last check must still be there.
        for (name, *_), before, after in zip(self.parts, self.values, read(self.parts)):
            if not torch.equal(before, after):
                self.violations.append(f"end: {name} moved while frozen")
        out = {
            "world_size": args.world_size,
            "rank": args.process_index,
            "engine": detect_engine(args, self.neq._model).value,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "global_step": state.global_step,
            "records": self.records,
            "violations": self.violations,
            "frozen_elements_checked": self.frozen_elements,
            "final_params_digest": tensor_digest(self.neq._model.named_parameters()),
        }
        with open(os.path.join(self.out_dir, f"rank{args.process_index}.json"), "w") as f:
            json.dump(out, f)
        if state.is_world_process_zero:
            weights = {k: v.detach().clone() for k, v in self.neq._model.state_dict().items()}
            torch.save(weights, os.path.join(self.out_dir, "final_state.pt"))
        return control


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, held_out = datasets(args)
    model = build_model(args.model, args.dropout)
    extra = {}
    if args.save_steps:
        extra.update(save_strategy="steps", save_steps=args.save_steps)
    if args.activation_checkpointing:
        extra.update(activation_checkpointing=True)
    if args.ddp_find_unused_parameters is not None:
        extra["ddp_find_unused_parameters"] = args.ddp_find_unused_parameters == "true"
    if args.sequential:
        extra["train_sampling_strategy"] = "sequential"
    if args.fsdp:
        extra.update(fsdp="full_shard", fsdp_config={"version": args.fsdp})
    targs = training_args(
        args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        logging_steps=args.check_every,
        # transformers multiplies the loss by the number of processes for models taking **kwargs, which sequence
        # classification losses do not use: keep the loss a plain mean so that N processes match one.
        average_tokens_across_devices=False,
        **extra,
    )
    config = NEqConfig(
        min_loss_drop=args.min_loss_drop,
        checks_from_loss_drop=args.checks_from_loss_drop,
        settle_fraction=args.settle_fraction,
        criterion="absolute",
        layer_threshold=1.0,
        granularity="unit",
        eps=args.eps,
        check_every=args.check_every,
        holdout_batch_size=args.holdout_batch_size,
    )
    trainer = NEqTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=pad_collator,
        neq_config=config,
        neq_dataset=held_out,
    )
    trainer.add_callback(Probe(trainer.neq_callback, args.out))
    trainer.train(resume_from_checkpoint=args.resume)
    # Leave the process group on every rank before the interpreter exits: a gloo group torn down by the exit
    # itself can abort a rank ("terminate called without an active exception") after a successful run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
