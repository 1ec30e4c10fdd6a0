"""One NEq run in a custom Accelerate training loop (no Trainer) on a tiny random model, launched by `torchrun` (or
plainly, or imported and called in-process as one process).

At every NEq check a probe verifies what `neq_run.py` verifies for the Trainer (same masks on every process, frozen
slices bit-identical since the previous check, same parameters on every process) and records it; the run writes
``<out>/rank<r>.json`` (same layout as ``neq_run.py``) and, on rank 0, ``<out>/final_state.pt``. With ``--save_at K``
the loop saves ``<out>/step_K`` with ``accelerator.save_state`` (NEq registered for checkpointing); ``--resume
<out>/step_K`` continues such a run.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/distributed/no_trainer_run.py --out DIR [options]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny models and datasets of conftest.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import pad_collator  # noqa: E402
from neq_run import build_model, datasets, frozen_parts  # noqa: E402

from neq_hf import NEq, NEqConfig, discover_units  # noqa: E402
from neq_hf.distributed import (  # noqa: E402
    assert_same_masks,
    detect_engine,
    gather_strings,
    is_dtensor,
    tensor_digest,
)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process's shard under FSDP2; collective there)."""
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t


def read_parts(parts) -> list[torch.Tensor]:
    return [(full(p) if idx is None else full(p).index_select(dim, idx)).clone() for _, p, dim, idx in parts]


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="bert", choices=["bert", "llama"])
    p.add_argument("--max_steps", type=int, default=16)
    p.add_argument("--check_every", type=int, default=4)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--train_samples", type=int, default=160)
    p.add_argument("--holdout_samples", type=int, default=24)
    p.add_argument("--holdout_batch_size", type=int, default=5)
    p.add_argument("--dropout", type=float, default=None, help="override hidden/attention dropout")
    p.add_argument("--fused", default="true", choices=["true", "false"], help="fused AdamW (the Trainer's default)")
    p.add_argument("--sequential", action="store_true", help="read training data in order")
    p.add_argument("--save_at", type=int, default=0, help="accelerator.save_state at this step (0: never)")
    p.add_argument("--stop_at_save", action="store_true", help="stop right after saving (an interrupted run)")
    p.add_argument("--resume", default=None, help="a step_K folder written by --save_at")
    p.add_argument("--find_unused_parameters", default="true", choices=["true", "false"])
    p.add_argument("--fsdp2", action="store_true", help="shard the model with fully_shard (every layer, then all)")
    return p.parse_args(argv)


class Probe:
    """What `neq_run.Probe` checks and records for the Trainer, for the engine."""

    def __init__(self, neq: NEq):
        self.neq = neq
        # neq_run's helpers read the callback's attributes; the engine has the same parts.
        self.view = SimpleNamespace(tracker=neq.tracker, _model=neq.model, unit_map=neq.unit_map, freezer=neq.freezer)
        self.records: list[dict] = []
        self.violations: list[str] = []
        self.parts: list = []
        self.values: list[torch.Tensor] = []
        self.frozen_elements = 0

    def after_check(self, step: int) -> None:
        tracker = self.neq.tracker
        for (name, *_), before, after in zip(self.parts, self.values, read_parts(self.parts)):
            self.frozen_elements += before.numel()
            if not torch.equal(before, after):
                diff = (before.float() - after.float()).abs().max().item()
                self.violations.append(f"step {step}: {name} moved by {diff:.3g} while frozen")
        digest = assert_same_masks(tracker.frozen)
        params_digest = tensor_digest(self.neq.model.named_parameters())
        if len(set(gather_strings(params_digest))) != 1:
            self.violations.append(f"step {step}: parameters differ across processes")
        last = tracker.history[-1]
        self.records.append(
            {
                "step": step,
                "check": last["check"],
                "digest": digest,
                "params_digest": params_digest,
                "frozen_fraction": last["frozen_fraction"],
                "stop_layer": self.neq.freezer.stop_layer,
                "trainable_parameters": self.neq.freezer.trainable_parameters(),
                "phi": {f"{k[0]}/{k[1]}": tracker.phi[k].tolist() for k in tracker.keys},
                "v": {f"{k[0]}/{k[1]}": tracker.v[k].tolist() for k in tracker.keys},
                "frozen": {f"{k[0]}/{k[1]}": tracker.frozen[k].int().tolist() for k in tracker.keys},
            }
        )
        self.parts = frozen_parts(self.view)
        self.values = read_parts(self.parts)

    def end(self) -> list[str]:
        for (name, *_), before, after in zip(self.parts, self.values, read_parts(self.parts)):
            if not torch.equal(before, after):
                self.violations.append(f"end: {name} moved while frozen")
        return self.violations


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters == "true")
    # One scheduler step per optimizer step whatever the number of processes, so that N processes match one.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False)
    train, held_out = datasets(args)
    model = build_model(args.model, args.dropout)
    if args.fsdp2:  # sharded by hand, as a custom loop would: every layer, then the whole model
        from torch.distributed.fsdp import fully_shard

        for layer in discover_units(model).layer_list:
            fully_shard(layer)
        fully_shard(model)
    fused = args.fused == "true" and not args.fsdp2
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=fused)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=not args.sequential, collate_fn=pad_collator)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, args.max_steps)
    if args.fsdp2:
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    config = NEqConfig(
        min_loss_drop=0,
        criterion="absolute",
        layer_threshold=1.0,
        granularity="unit",
        eps=args.eps,
        check_every=args.check_every,
        holdout_batch_size=args.holdout_batch_size,
    )
    neq = NEq(model, config, held_out, data_collator=pad_collator)
    accelerator.register_for_checkpointing(neq)
    step = 0
    if args.resume:
        accelerator.load_state(args.resume)
        step = int(Path(args.resume).name.split("_")[-1])
    neq.setup(max_steps=args.max_steps)  # the reference check, unless the state was just loaded
    probe = Probe(neq)
    probe.after_check(step)

    steps_per_epoch = len(loader)
    model.train()
    while step < args.max_steps:
        skip = step % steps_per_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            loss = model(**batch).loss
            accelerator.backward(loss)
            if args.fsdp2:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            else:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            neq.before_optimizer_step(optimizer)
            optimizer.step()
            neq.after_optimizer_step(optimizer)
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if neq.step_end(step, epoch=step / steps_per_epoch) is not None:
                probe.after_check(step)
            if step == args.save_at:
                accelerator.save_state(os.path.join(args.out, f"step_{step}"))
                if args.stop_at_save:
                    return {}
            if step >= args.max_steps:
                break
    neq.close()
    violations = probe.end()

    rank = accelerator.process_index
    out = {
        "world_size": accelerator.num_processes,
        "rank": rank,
        "engine": detect_engine(None, model).value,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "global_step": step,
        "records": probe.records,
        "violations": violations,
        "frozen_elements_checked": probe.frozen_elements,
        "final_params_digest": tensor_digest(neq.model.named_parameters()),
        "summary": {k: v for k, v in neq.summary().items() if not (isinstance(v, float) and math.isnan(v))},
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    weights = {k: full(v).clone() for k, v in neq.model.state_dict().items()}
    if accelerator.is_main_process:
        torch.save(weights, os.path.join(args.out, "final_state.pt"))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # leave the process group before the exit (see neq_run.py)
    return out


if __name__ == "__main__":
    main()
