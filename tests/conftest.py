"""Shared fixtures: tiny random models built from configs and small token datasets, all offline."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

VOCAB = 96


def tiny_config(model_type: str, **overrides):
    """A tiny random config of ``model_type`` (2 layers, width 32, 4 heads; GQA with 2 K/V heads for decoders)."""
    from transformers import (
        BertConfig,
        DistilBertConfig,
        ElectraConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        RobertaConfig,
    )

    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if model_type in ("bert", "roberta", "electra"):
        cls = {"bert": BertConfig, "roberta": RobertaConfig, "electra": ElectraConfig}[model_type]
        kw = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
        )
        if model_type == "electra":
            kw["embedding_size"] = 32
        cfg = cls(**common, **kw)
    elif model_type == "distilbert":
        cfg = DistilBertConfig(**common, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)
    elif model_type == "gpt2":
        cfg = GPT2Config(
            **common, bos_token_id=1, eos_token_id=2, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64
        )
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
        cfg = cls(
            **common,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_classifier(model_type: str = "bert", seed: int = 0, num_labels: int = 2):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=num_labels))


def token_dataset(n: int = 96, seed: int = 0, min_len: int = 4, max_len: int = 16, with_labels: bool = True):
    """Random token sequences of varied length; the label is a learnable function of the tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * length}
        if with_labels:
            row["labels"] = int(sum(ids) % 2)
        rows.append(row)
    return Dataset.from_list(rows)


def pad_collator(features):
    """Right-padding collator (no tokenizer needed)."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [0] * (length - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor(
            [f["attention_mask"] + [0] * (length - len(f["attention_mask"])) for f in features]
        ),
    }
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    return batch


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    kw = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=12,
        learning_rate=1e-3,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


@pytest.fixture
def dataset():
    return token_dataset()


def unit_mask(n: int, frozen) -> torch.Tensor:
    """An activity mask of ``n`` units with the indices in ``frozen`` frozen."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(frozen)] = False
    return mask


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """Environment for multi-process test runs: offline, one thread per process, no inherited launcher config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def paper_rule(**overrides):
    """The paper's absolute rule with units frozen one by one and no progress gate: the per-unit mechanics the tests
    exercise (the library's default freezes whole layers only)."""
    from neq_hf import NEqConfig

    config = {"min_loss_drop": 0, "criterion": "absolute", "layer_threshold": 1.0, "granularity": "unit"}
    return NEqConfig(**{**config, **overrides})


def write_results(folder, runs):
    """Result files as `benchmarks/glue_compare.py` names them: `<task>_<method>_seed<k>.json`."""
    import json

    os.makedirs(folder, exist_ok=True)
    for r in runs:
        with open(os.path.join(folder, f"{r['task']}_{r['method']}_seed{r['seed']}.json"), "w") as f:
            json.dump(r, f)
