"""`NEqTrainerCallback` inside trl's `SFTTrainer`, on a tiny random Llama with a word-level tokenizer built offline."""

import pytest
import torch
from conftest import VOCAB, paper_rule, tiny_config
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, PreTrainedTokenizerFast, TrainerCallback

from neq_hf import NEqTrainerCallback, split_holdout
from neq_hf.holdout import build_holdout_loader

pytest.importorskip("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
HD = 8


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def sft_rows(kind: str, n: int = 80, seed: int = 0) -> Dataset:
    """Prompts of random words; the completion shifts the first three words by one."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, len(WORDS), (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        prompt = " ".join(WORDS[i] for i in ids)
        completion = " " + " ".join(WORDS[(i + 1) % len(WORDS)] for i in ids[:3])
        rows.append(
            {"prompt": prompt, "completion": completion}
            if kind == "prompt-completion"
            else {"text": prompt + completion}
        )
    return Dataset.from_list(rows)


def tiny_llama():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", bos_token_id=1, eos_token_id=2))


def sft_trainer(tmp_path, tokenizer, kind="prompt-completion", max_steps=8, **kwargs):
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=max_steps,
        learning_rate=1e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kwargs.pop("args", {}),
    )
    return SFTTrainer(
        model=kwargs.pop("model", None) or tiny_llama(),
        args=args,
        train_dataset=sft_rows(kind),
        processing_class=tokenizer,
        **kwargs,
    )


def add_neq(trainer, config):
    """Carve the held-out split from the dataset SFTTrainer prepared (tokenized, labels built) and plug NEq in."""
    trainer.train_dataset, held = split_holdout(trainer.train_dataset, 16)
    neq = NEqTrainerCallback(config, neq_dataset=held)
    trainer.add_callback(neq)
    return neq


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class SnapshotAt(TrainerCallback):
    def __init__(self, step):
        self.step, self.params = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:  # after NEq's check of this step (NEq was added first)
            self.params = snapshot(model)


@pytest.mark.parametrize("kind", ["prompt-completion", "text"])
def test_sft_trainer_freezes_units_and_keeps_them_exact(tmp_path, tokenizer, kind):
    trainer = sft_trainer(tmp_path, tokenizer, kind)
    assert {"input_ids"} <= set(trainer.train_dataset.column_names)
    neq = add_neq(
        trainer,
        paper_rule(eps=1.0, check_every=2),
    )
    assert len(trainer.train_dataset) == 64
    at = SnapshotAt(4)
    trainer.add_callback(at)
    trainer.train()

    checks = {h["step"]: h for h in neq.tracker.history}
    assert checks[2]["frozen_fraction"] == 0.0
    for step in (4, 6, 8):
        assert checks[step]["frozen_fraction"] == 1.0 and checks[step]["backward_stops_at_layer"] == 2
    model = trainer.model
    after = snapshot(model)
    for n in after:
        if n.startswith("model.layers.") or n == "model.embed_tokens.weight":
            assert torch.equal(at.params[n], after[n]), n
    assert not torch.equal(at.params["lm_head.weight"], after["lm_head.weight"])
    assert any("neq/frozen_fraction" in logs for logs in trainer.state.log_history)
    assert all(p.requires_grad for p in model.parameters())  # released at the end of training


def test_sft_trainer_with_lora_freezes_adapter_rows(tmp_path, tokenizer):
    from peft import LoraConfig

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    trainer = sft_trainer(tmp_path, tokenizer, peft_config=lora, max_steps=6)
    neq = add_neq(
        trainer,
        paper_rule(eps=0.0, check_every=2),
    )
    masks = {(0, "heads"): torch.tensor([False, False, True, True]), (1, "heads"): torch.zeros(4, dtype=torch.bool)}

    class FixedMasks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            neq.freezer.apply(masks)

    trainer.add_callback(FixedMasks())
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert {b.name.rsplit(".", 2)[-2] for b in neq.unit_map.layers[0].bindings} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    p0, p1 = "base_model.model.model.layers.0.self_attn.", "base_model.model.model.layers.1.self_attn."
    for proj, rows in (("q_proj", 2 * HD), ("k_proj", HD), ("v_proj", HD)):  # heads 0, 1 and K/V head 0
        b = f"{p0}{proj}.lora_B.default.weight"
        assert torch.equal(after[b][:rows], before[b][:rows])
        assert (after[b][rows:] != before[b][rows:]).any(dim=1).all()
    a = f"{p0}o_proj.lora_A.default.weight"
    assert torch.equal(after[a][:, : 2 * HD], before[a][:, : 2 * HD])
    for n in before:
        if n.startswith(p1) or ".lora_" not in n:
            assert torch.equal(before[n], after[n]), n


def test_padding_free_sft_gets_a_padded_holdout_pass(tmp_path, tokenizer):
    trainer = sft_trainer(tmp_path, tokenizer, args=dict(padding_free=True, max_length=None))
    assert trainer.data_collator.padding_free
    neq = add_neq(
        trainer,
        paper_rule(eps=1.0, check_every=2),
    )
    trainer.train()
    batches = list(neq._loader)
    assert all("attention_mask" in b for b in batches)
    assert sum(b["input_ids"].shape[0] for b in batches) == 16  # one row per held-out sample
    assert trainer.data_collator.padding_free  # the training collator itself is left alone
    assert neq.tracker.history[-1]["frozen_fraction"] == 1.0

    with pytest.raises(ValueError, match="pooled per sample"):
        next(iter(build_holdout_loader(neq.dataset, trainer.model, DataCollatorWithFlattening(), 4)))
