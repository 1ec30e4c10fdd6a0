"""NEq on a model of your own: a plain `nn.Module` without a transformers config.

NEq finds attention heads and MLP neurons from a table of module paths keyed by `config.model_type`; a model without a
config is looked up by its class name. Register where its layers, projections and heads are, and give the head count
(which a transformers model would read from its config):

    register_architecture("TinyClassifier", ArchitectureSpec(
        layers="blocks", q="attn.q", k="attn.k", v="attn.v", o="attn.out", up="mlp.up", down="mlp.down", num_heads=4,
    ))

`num_kv_heads` (grouped-query attention) and `head_dim` are optional. The spec is checked against the modules when
training starts: `up` must map the hidden size to the MLP width and `down` back, Q/K/V must read the hidden size, and
the heads must tile the attention output projection's input; a mismatch is an error naming the modules and shapes.

The model's `forward` takes `input_ids`, `attention_mask` and `labels` and returns a dict with `loss` and `logits`,
as a `Trainer` expects. Run it (a few seconds on a CPU):

    python examples/custom_model.py
"""

from __future__ import annotations

import tempfile
from typing import Optional

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import TrainingArguments

from neq_hf import ArchitectureSpec, NEqConfig, NEqTrainer, register_architecture

VOCAB, HIDDEN, HEADS, MLP_WIDTH, LAYERS = 64, 32, 4, 64, 2


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (p(x).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool())
        # The heads' outputs side by side, (batch, tokens, heads * head_dim): what NEq watches, per head.
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # NEq watches each of the `width` neurons at the input of `down`


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, width: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(hidden), Attention(hidden, heads)
        self.norm2, self.mlp = nn.LayerNorm(hidden), MLP(hidden, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TinyClassifier(nn.Module):
    """A small pre-norm transformer encoder with a mean-pooled classification head."""

    def __init__(self, num_labels: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block(HIDDEN, HEADS, MLP_WIDTH) for _ in range(LAYERS))
        self.norm, self.head = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> dict:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        logits = self.head((self.norm(x) * weights).sum(1) / weights.sum(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


SPEC = ArchitectureSpec(
    layers="blocks", q="attn.q", k="attn.k", v="attn.v", o="attn.out", up="mlp.up", down="mlp.down", num_heads=HEADS
)


def toy_dataset(n: int, seed: int = 0) -> Dataset:
    """Token sequences of varied length; the label says whether low tokens outnumber high ones."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(6, 17, (1,), generator=g)),), generator=g)
        rows.append({"input_ids": ids.tolist(), "labels": int((ids < VOCAB // 2).sum() * 2 > len(ids))})
    return Dataset.from_list(rows)


def collate(features: list[dict]) -> dict:
    length = max(len(f["input_ids"]) for f in features)
    pad = [length - len(f["input_ids"]) for f in features]
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)]),
        "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)]),
    }
    if "labels" in features[0]:  # the held-out pass gets inputs only
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    return batch


def main(output_dir: Optional[str] = None, max_steps: int = 60) -> NEqTrainer:
    """Train the tiny model with NEq; returns the trainer (its `neq_summary()` says what froze)."""
    register_architecture(type(TinyClassifier()).__name__, SPEC)  # no config: looked up by class name
    torch.manual_seed(0)
    model = TinyClassifier()
    args = TrainingArguments(
        output_dir or tempfile.mkdtemp(prefix="neq_custom_"),
        max_steps=max_steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=max_steps // 4 or 1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = NEqTrainer(
        model=model,
        args=args,
        train_dataset=toy_dataset(640),
        data_collator=collate,
        neq_config=NEqConfig(check_every=max(1, max_steps // 10), holdout_size=64),
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    summary = main().neq_summary()
    print(
        f"frozen at the end: {summary['final_frozen_fraction']:.1%} of units (heads "
        f"{summary['final_frozen_fraction/heads']:.1%}, neurons {summary['final_frozen_fraction/neurons']:.1%})"
    )
