"""The frozen-prefix cache: served states equal recomputation, training steps are unchanged, the cache follows the
frozen prefix up and down, respects its budget, and a Trainer run resumes with it."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import pad_collator, tiny_config, token_dataset
from transformers import AutoModelForSequenceClassification

from neq_hf import NEqConfig
from neq_hf.freezing import Freezer
from neq_hf.prefix_cache import FrozenPrefixCache, _keys, _real_tokens
from neq_hf.units import discover_units

NO_DROPOUT = dict(
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0, attention_dropout=0.0
)


def build(model_type="bert", layers=2, dropout=True, seed=0):
    overrides = {"num_hidden_layers": layers, "num_labels": 2}
    if not dropout:
        overrides.update(NO_DROPOUT)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, **overrides))
    unit_map = discover_units(model)
    return model, unit_map


def batch_of(ds, idx):
    return pad_collator([ds[i] for i in idx])


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def freezer_for(model, unit_map, batch):
    freezer = Freezer(model, unit_map)
    freezer.locate_embeddings(model, lambda: model(**inputs(batch)))
    return freezer


def freeze_bottom(freezer, unit_map, k):
    """Freeze every unit of layers < k (the embeddings follow)."""
    masks = {}
    for layer in unit_map.layers:
        for kind in ("heads", "neurons"):
            n = layer.num_units(kind)
            masks[(layer.index, kind)] = torch.full((n,), layer.index >= k)
    freezer.apply(masks)


def with_cache(model, unit_map, batch, **kw):
    cache = FrozenPrefixCache(model, unit_map.layer_list, **kw)
    cache.locate(lambda: model(**inputs(batch)))
    return cache


class Entry:
    """Records the hidden states entering a layer (or leaving the last one) and counts calls to a module."""

    def __init__(self, module, output=False):
        self.x, self.calls = None, 0
        if output:
            self.h = module.register_forward_hook(self._out)
        else:
            self.h = module.register_forward_pre_hook(self._in, with_kwargs=True)

    def _in(self, module, args, kwargs):
        self.calls += 1
        self.x = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def _out(self, module, args, output):
        self.calls += 1
        self.x = output.detach().clone()


def embedding_module(model):
    return model.get_input_embeddings()


def first_linear(layer):
    return next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_served_states_equal_recomputation(model_type):
    model, unit_map = build(model_type, dropout=False)
    ds = token_dataset(24)
    batch = batch_of(ds, range(8))
    freezer = freezer_for(model, unit_map, batch)
    cache = with_cache(model, unit_map, batch)
    freeze_bottom(freezer, unit_map, 1)
    assert cache.update(freezer) == 1

    at_layer = Entry(unit_map.layer_list[1])
    embed, layer0 = Entry(embedding_module(model), output=True), Entry(first_linear(unit_map.layer_list[0]))
    model.eval()
    with torch.no_grad():
        ref_logits = model(**inputs(batch)).logits
    ref_x = at_layer.x
    mask = batch["attention_mask"].bool()

    model.train()
    fill_logits = model(**inputs(batch)).logits  # computes and stores the prefix
    fill_x = at_layer.x
    assert cache.stats["computed"] == 8 and len(cache) == 8
    embed.calls = layer0.calls = 0
    served_logits = model(**inputs(batch)).logits  # every sample cached
    assert cache.stats["served"] == 8
    assert layer0.calls == 0, "the frozen layer must not run"
    # the embeddings do not run: either not called, or called as a zero placeholder of their output's shape
    assert embed.calls == 0 or (embed.x.shape == (8, mask.shape[1], 32) and embed.x.abs().max() == 0)
    torch.testing.assert_close(fill_x[mask], ref_x[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(at_layer.x[mask], ref_x[mask], rtol=0, atol=1e-6)
    assert at_layer.x[~mask].abs().max() == 0  # padding enters as zeros
    torch.testing.assert_close(fill_logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(served_logits, ref_logits, rtol=0, atol=1e-6)

    # re-padded to another batch length: the same samples are served from the cache
    longer = pad_collator(
        [ds[i] for i in range(8)] + [{"input_ids": [5] * 20, "attention_mask": [1] * 20, "labels": 0}]
    )
    model(**inputs(longer))
    assert cache.stats["served"] == 16 and cache.stats["computed"] == 9
    torch.testing.assert_close(at_layer.x[:8, : mask.shape[1]][mask], ref_x[mask], rtol=0, atol=1e-6)
    cache.close()


def test_left_padded_decoder_is_served_exactly():
    model, unit_map = build("llama", dropout=False)
    feats = [token_dataset(8)[i] for i in range(8)]
    length = max(len(f["input_ids"]) for f in feats)
    pad = [length - len(f["input_ids"]) for f in feats]
    batch = {
        "input_ids": torch.tensor([[0] * p + f["input_ids"] for p, f in zip(pad, feats)]),
        "attention_mask": torch.tensor([[0] * p + [1] * (length - p) for p in pad]),
    }
    freezer = freezer_for(model, unit_map, batch)
    cache = with_cache(model, unit_map, batch)
    freeze_bottom(freezer, unit_map, 1)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    model.train()
    filled, served = model(**batch).logits, model(**batch).logits
    assert cache.stats["computed"] == 8 and cache.stats["served"] == 8
    torch.testing.assert_close(filled, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(served, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_training_steps_match_recomputation_with_prefix_in_eval_mode(model_type):
    ds = token_dataset(32)
    batches = [batch_of(ds, range(i, i + 8)) for i in (0, 8, 0, 8)]  # fills, then serves
    results = []
    for cached in (False, True):
        model, unit_map = build(model_type, dropout=True, seed=1)
        freezer = freezer_for(model, unit_map, batches[0])
        if cached:
            cache = with_cache(model, unit_map, batches[0])
        freeze_bottom(freezer, unit_map, 1)
        if cached:
            cache.update(freezer)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        if not cached:  # what the cache does to the prefix: no dropout there
            embedding_module(model).eval() if model_type == "llama" else model.bert.embeddings.eval()
            unit_map.layer_list[0].eval()
        losses, grads = [], []
        torch.manual_seed(7)
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad()
        results.append((losses, grads))
        if cached:
            assert cache.stats["computed"] == 16 and cache.stats["served"] == 16
    (losses0, grads0), (losses1, grads1) = results
    torch.testing.assert_close(torch.stack(losses1), torch.stack(losses0), rtol=0, atol=1e-6)
    for g0, g1 in zip(grads0, grads1):
        assert g0.keys() == g1.keys() and not any("layer.0." in n or "layers.0." in n for n in g0)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6)


def test_extends_upward_running_only_the_newly_frozen_layers():
    model, unit_map = build("bert", layers=3, dropout=False)
    ds = token_dataset(16)
    batch = batch_of(ds, range(8))
    freezer = freezer_for(model, unit_map, batch)
    cache = with_cache(model, unit_map, batch)
    layers = unit_map.layer_list
    mask = batch["attention_mask"].bool()
    model.train()
    freeze_bottom(freezer, unit_map, 1)
    cache.update(freezer)
    model(**inputs(batch))
    assert cache.stats["computed"] == 8

    runs = [Entry(first_linear(layer)) for layer in layers]
    for k, watch in ((2, Entry(layers[2])), (3, Entry(layers[2], output=True))):
        freeze_bottom(freezer, unit_map, k)
        assert cache.update(freezer) == k and len(cache) == 8  # kept, extended lazily
        model.eval()
        with torch.no_grad():
            model(**inputs(batch))
        ref = watch.x
        model.train()
        for r in runs:
            r.calls = 0
        model(**inputs(batch))  # extends: runs layer k-1 only
        assert [r.calls for r in runs[:k]] == [0] * (k - 1) + [1]
        assert cache.stats["extended"] == 8 * (k - 1) and cache.stats["computed"] == 8
        torch.testing.assert_close(watch.x[mask], ref[mask], rtol=0, atol=1e-6)
        for r in runs:
            r.calls = 0
        model(**inputs(batch))  # served
        assert sum(r.calls for r in runs[:k]) == 0
        torch.testing.assert_close(watch.x[mask], ref[mask], rtol=0, atol=1e-6)


def test_release_and_modified_parameters_invalidate():
    model, unit_map = build("bert", dropout=False)
    ds = token_dataset(16)
    batch = batch_of(ds, range(8))
    freezer = freezer_for(model, unit_map, batch)
    cache = with_cache(model, unit_map, batch)
    model.train()
    freeze_bottom(freezer, unit_map, 1)
    cache.update(freezer)
    model(**inputs(batch))
    assert len(cache) == 8

    freeze_bottom(freezer, unit_map, 0)  # layer 0 released
    assert cache.update(freezer) == 0 and len(cache) == 0 and cache.stats["invalidations"] == 1
    embed = Entry(embedding_module(model), output=True)
    model(**inputs(batch))
    assert embed.calls == 1 and len(cache) == 0  # plain forward, nothing cached

    freeze_bottom(freezer, unit_map, 1)
    model(**inputs(batch))  # the cache notices the new prefix by itself
    assert cache.depth == 1 and cache.stats["computed"] == 16
    with torch.no_grad():  # a frozen weight changed in place (e.g. a checkpoint loaded)
        unit_map.layer_list[0].attention.self.query.weight.mul_(2)
    at_layer = Entry(unit_map.layer_list[1])
    model(**inputs(batch))
    assert cache.stats["invalidations"] == 2 and cache.stats["computed"] == 24
    fresh = at_layer.x
    model.eval()
    with torch.no_grad():
        model(**inputs(batch))
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(fresh[mask], at_layer.x[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("on_disk", [False, True])
def test_budget_is_respected_and_uncached_samples_still_exact(on_disk, tmp_path, caplog):
    model, unit_map = build("bert", dropout=False)
    ds = token_dataset(32)
    batch = batch_of(ds, range(32))
    real = int(batch["attention_mask"].sum())
    width = model.config.hidden_size
    budget_rows = real // 2
    budget = budget_rows * width * 4 / 2**20
    freezer = freezer_for(model, unit_map, batch)
    path = str(tmp_path / "prefix.bin") if on_disk else None
    cache = with_cache(model, unit_map, batch, max_megabytes=budget, path=path)
    freeze_bottom(freezer, unit_map, 1)
    cache.update(freezer)
    at_layer = Entry(unit_map.layer_list[1])
    mask = batch["attention_mask"].bool()
    model.eval()
    with torch.no_grad():
        model(**inputs(batch))
    ref = at_layer.x
    model.train()
    with caplog.at_level(logging.WARNING, logger="neq_hf.prefix_cache"):
        model(**inputs(batch))
        model(**inputs(batch))
    assert "budget" in caplog.text and "prefix_cache_megabytes" in caplog.text
    assert 0 < len(cache) < 32 and cache.megabytes <= budget
    assert sum(len(ds[i]["input_ids"]) for i in range(len(cache))) <= budget_rows
    assert cache.stats["served"] == len(cache) and cache.stats["computed"] == 64 - len(cache)
    torch.testing.assert_close(at_layer.x[mask], ref[mask], rtol=0, atol=1e-6)
    if on_disk:
        assert (tmp_path / "prefix.bin").exists()
    cache.close()


def test_keys_follow_real_tokens_only():
    a = {"input_ids": torch.tensor([[5, 6, 7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    b = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    left = {"input_ids": torch.tensor([[0, 5, 6, 7]]), "attention_mask": torch.tensor([[0, 1, 1, 1]])}
    typed = {**b, "token_type_ids": torch.tensor([[0, 0, 1]])}
    key = {name: _keys(x, _real_tokens(x))[0] for name, x in dict(a=a, b=b, left=left, typed=typed).items()}
    assert key["a"] == key["b"]  # right padding does not matter
    assert key["left"] != key["b"]  # other positions: other states
    assert key["typed"] != key["b"]


def test_eval_forwards_and_unsupported_inputs_bypass_the_cache(caplog):
    model, unit_map = build("bert", dropout=False)
    batch = batch_of(token_dataset(8), range(8))
    freezer = freezer_for(model, unit_map, batch)
    cache = with_cache(model, unit_map, batch)
    freeze_bottom(freezer, unit_map, 1)
    model.eval()
    model(**inputs(batch))
    assert len(cache) == 0
    model.train()
    with caplog.at_level(logging.WARNING, logger="neq_hf.prefix_cache"):
        model(**inputs(batch), output_hidden_states=True)
    assert len(cache) == 0 and cache.stats["bypassed_batches"] == 1 and "output_hidden_states" in caplog.text


def test_refuses_gradient_checkpointing():
    model, unit_map = build("bert")
    batch = batch_of(token_dataset(8), range(8))
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing.*cache_frozen_prefix=False"):
        with_cache(model, unit_map, batch)


def test_config_fields():
    assert NEqConfig(min_loss_drop=0).cache_frozen_prefix is False
    assert NEqConfig(cache_frozen_prefix="AUTO").cache_frozen_prefix == "auto"
    assert NEqConfig(cache_frozen_prefix="true").cache_frozen_prefix is True
    assert NEqConfig(cache_frozen_prefix="no").cache_frozen_prefix is False
    with pytest.raises(ValueError, match=r"cache_frozen_prefix='sometimes' is invalid.*'auto'"):
        NEqConfig(cache_frozen_prefix="sometimes")
    # "auto" without frozen embeddings resolves to no training cache instead of refusing
    assert NEqConfig(freeze_embeddings=False, cache_frozen_prefix="auto").cache_frozen_prefix == "auto"
    with pytest.raises(ValueError, match="freeze_embeddings=True"):
        NEqConfig(min_loss_drop=0, cache_frozen_prefix=True, freeze_embeddings=False)
    with pytest.raises(ValueError, match="prefix_cache_megabytes"):
        NEqConfig(min_loss_drop=0, prefix_cache_megabytes=0)


def test_tied_embeddings_that_train_disable_the_cache(caplog):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config("gpt2"))
    unit_map = discover_units(model)
    batch = batch_of(token_dataset(8), range(8))
    cache = with_cache(model, unit_map, batch)
    for p in unit_map.layer_list[0].parameters():
        p.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="neq_hf.prefix_cache"):
        assert cache.update() == 0  # wte is tied to lm_head and trains
    assert "embeddings still train" in caplog.text
    model.transformer.wte.weight.requires_grad_(False)
    model.transformer.wpe.weight.requires_grad_(False)
    assert cache.update() == 1


# -- inside the Trainer ---------------------------------------------------------------------------------------------
@pytest.fixture
def scripted_freezing(monkeypatch):
    """Decisions by script (check t runs at step 2t - 2): layer 0 frozen at step 2, released at step 4, frozen again
    at steps 6-10, layers 0 and 1 frozen from step 12. With 10 steps an epoch, the cache fills, is invalidated, refills,
    is served in the second epoch and extends."""
    from neq_hf.tracker import EquilibriumTracker

    original = EquilibriumTracker.check

    def check(self, *args, **kwargs):
        figures = original(self, *args, **kwargs)
        frozen_layers = {2: 1, 3: 0, 4: 1, 5: 1, 6: 1}.get(self.t, 2 if self.t >= 7 else 0)
        for key, mask in self.frozen.items():
            self.frozen[key] = torch.full_like(mask, key[0] < frozen_layers)
        return figures

    monkeypatch.setattr(EquilibriumTracker, "check", check)


def _cached_run(tmp_path, name, resume=None):
    from conftest import training_args

    from neq_hf import NEqTrainer

    trainer = NEqTrainer(
        model=build("bert", seed=3)[0],
        args=training_args(
            tmp_path / name, max_steps=16, save_strategy="steps", save_steps=8, learning_rate=3e-3, seed=1
        ),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=NEqConfig(min_loss_drop=0, check_every=2, holdout_size=16, cache_frozen_prefix=True),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, trainer.neq_callback.engine.prefix_cache


def test_trainer_run_with_cache_resumes_like_an_uninterrupted_run(tmp_path, scripted_freezing):
    full, cache_full = _cached_run(tmp_path, "full")
    stats = cache_full.stats
    assert stats["served"] > 0 and stats["computed"] > 0 and stats["extended"] > 0
    assert stats["invalidations"] == 1  # the release at step 4 only: optimizer steps leave frozen weights alone
    summary = full.neq_callback.engine.summary()["prefix_cache"]
    assert summary["samples"] == 0 and 0 < summary["peak_samples"] <= 80  # emptied at the end of training
    ckpt = tmp_path / "full" / "checkpoint-8"
    assert not any("prefix" in f.name for f in ckpt.iterdir())  # the cache is not checkpointed
    resumed, cache_resumed = _cached_run(tmp_path, "resumed", resume=str(ckpt))
    assert cache_resumed.stats["served"] > 0 and cache_resumed.stats["computed"] > 0
    assert cache_resumed.stats["invalidations"] == 0
    params = dict(resumed.model.named_parameters())
    for n, p in full.model.named_parameters():
        torch.testing.assert_close(params[n], p, rtol=1e-5, atol=1e-6, msg=n)
    # hooks and patches are gone after training: a plain forward again
    assert not any("forward" in m.__dict__ for m in full.model.modules())


# -- held-out checks above the frozen prefix ------------------------------------------------------------------------
def _checked_run(tmp_path, name, skip, lora=False, duplicates=False, cache_training=False):
    from conftest import training_args
    from datasets import concatenate_datasets
    from peft import LoraConfig

    from neq_hf import NEqTrainer

    # LoRA on the attention only: a layer whose heads froze has nothing left to train although its MLP neurons were
    # never frozen, and the pass may skip it all the same (its outputs cannot change)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS") if lora else None
    trainer = NEqTrainer(
        model=build("bert", layers=3, seed=3)[0],
        args=training_args(
            tmp_path / name,
            max_steps=16,
            learning_rate=3e-3,
            seed=1,
            per_device_eval_batch_size=4 if duplicates else 16,
        ),
        # with duplicates, held-out samples repeat (in other held-out batches, and in the training set): the cache
        # serves a repeat that another batch already extended, so a batch's samples start from different depths
        train_dataset=concatenate_datasets([token_dataset(24)] * 4) if duplicates else token_dataset(96),
        data_collator=pad_collator,
        neq_config=NEqConfig(
            min_loss_drop=0,
            check_every=2,
            holdout_size=16,
            checks_skip_frozen_prefix=skip,
            cache_frozen_prefix=cache_training,
        ),
        peft_config=peft,
    )
    engine_calls = Entry(trainer.model.get_input_embeddings(), output=True)
    trainer.train()
    engine_calls.h.remove()
    return trainer, engine_calls.calls


@pytest.mark.parametrize("lora", [False, True])
def test_checks_skip_the_frozen_prefix_with_the_same_decisions(tmp_path, scripted_freezing, lora, monkeypatch):
    if lora:  # freeze the heads only: the layers' neurons stay unfrozen
        from neq_hf.tracker import EquilibriumTracker

        scripted = EquilibriumTracker.check

        def heads_only(self, *args, **kwargs):
            figures = scripted(self, *args, **kwargs)
            for key in self.frozen:
                if key[1] == "neurons":
                    self.frozen[key] = torch.zeros_like(self.frozen[key])
            return figures

        monkeypatch.setattr(EquilibriumTracker, "check", heads_only)
    plain, plain_calls = _checked_run(tmp_path, "plain", skip=False, lora=lora)
    skipped, skipped_calls = _checked_run(tmp_path, "skipped", skip=True, lora=lora)
    engine = skipped.neq_callback.engine
    assert plain.neq_callback.engine.prefix_cache is None
    assert engine.prefix_cache is not None and not engine.prefix_cache.serve_training
    assert engine.prefix_cache.stats["served"] > 0  # checks after the prefix froze started above it
    assert skipped_calls < plain_calls  # the embeddings ran less often (training forwards still run them)
    a, b = plain.neq_callback.engine.tracker, engine.tracker
    for key in a.keys:
        torch.testing.assert_close(b.phi[key], a.phi[key], rtol=0, atol=1e-6, equal_nan=True, msg=str(key))
        torch.testing.assert_close(b.v[key], a.v[key], rtol=0, atol=1e-6, equal_nan=True, msg=str(key))
        assert torch.equal(b.frozen[key], a.frozen[key])
    for ra, rb in zip(a.history, b.history):
        for kind in ("heads", "neurons"):
            assert rb[f"one_minus_phi/{kind}"] == pytest.approx(ra[f"one_minus_phi/{kind}"], abs=1e-6)
    params = dict(skipped.model.named_parameters())
    for n, p in plain.model.named_parameters():  # training forwards are untouched: the same run
        assert torch.equal(params[n], p), n
    assert not any("forward" in m.__dict__ for m in skipped.model.modules())  # patches removed after training


@pytest.mark.parametrize("cache_training", [False, True])
def test_checks_above_the_frozen_prefix_with_repeated_held_out_samples(tmp_path, scripted_freezing, cache_training):
    """A held-out batch whose samples the cache holds at different depths (a repeat extended by an earlier batch or by
    a training forward): the states it computes for the others must not be read as that layer's held-out outputs."""
    plain, _ = _checked_run(tmp_path, "plain", skip=False, duplicates=True, cache_training=cache_training)
    skipped, _ = _checked_run(tmp_path, "skipped", skip=True, duplicates=True, cache_training=cache_training)
    cache = skipped.neq_callback.engine.prefix_cache
    assert cache.stats["extended"] > 0 and cache.stats["served"] > 0
    a, b = plain.neq_callback.engine.tracker, skipped.neq_callback.engine.tracker
    assert len(b.history) == len(a.history)
    for key in a.keys:
        torch.testing.assert_close(b.phi[key], a.phi[key], rtol=0, atol=1e-6, equal_nan=True, msg=str(key))
        assert torch.equal(b.frozen[key], a.frozen[key])
    params = dict(skipped.model.named_parameters())
    for n, p in plain.model.named_parameters():  # the same training forwards (cached states may differ in rounding)
        torch.testing.assert_close(
            params[n], p, rtol=0 if not cache_training else 1e-5, atol=0 if not cache_training else 1e-6, msg=n
        )


# -- cache_frozen_prefix="auto" -------------------------------------------------------------------------------------
def _auto_run(tmp_path, name, checkpointing=False):
    from conftest import training_args

    from neq_hf import NEqTrainer

    trainer = NEqTrainer(
        model=build("bert", seed=3)[0],
        args=training_args(
            tmp_path / name, max_steps=16, learning_rate=3e-3, seed=1, activation_checkpointing=checkpointing
        ),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=NEqConfig(min_loss_drop=0, check_every=2, holdout_size=16, cache_frozen_prefix="auto"),
    )
    trainer.train()
    return trainer.neq_callback.engine


def test_auto_serves_training_on_a_cpu(tmp_path, scripted_freezing):
    engine = _auto_run(tmp_path, "auto")
    summary = engine.summary()
    assert summary["cache_frozen_prefix"] is True
    assert summary["prefix_cache"]["served"] > 0 and summary["prefix_cache"]["computed"] > 0


def test_auto_falls_back_to_the_checks_with_gradient_checkpointing(tmp_path, scripted_freezing, caplog):
    with caplog.at_level(logging.INFO, logger="neq_hf.engine"):
        engine = _auto_run(tmp_path, "ckpt", checkpointing=True)
    summary = engine.summary()
    assert summary["cache_frozen_prefix"] is False
    # the held-out checks still start above the frozen prefix
    assert summary["prefix_cache"]["served"] > 0


def test_auto_is_off_on_an_accelerator(tmp_path):
    from neq_hf.engine import NEq

    model, unit_map = build("bert")
    config = NEqConfig(min_loss_drop=0, holdout_size=16, cache_frozen_prefix="auto")
    engine = NEq(model, config, token_dataset(16), data_collator=pad_collator)
    assert engine._auto_cache_training() is True  # on this CPU
    engine._device = lambda: torch.device("cuda")
    assert engine._auto_cache_training() is False


def _epochs_run(tmp_path, name, epochs, cache, probes_in_train=False):
    from conftest import training_args

    from neq_hf import NEqTrainer

    trainer = NEqTrainer(
        model=build("bert", seed=3)[0],
        # 12 steps an epoch; the scripted decisions freeze layer 0 from step 2 (released at 4) and both from step 12
        args=training_args(tmp_path / name, max_steps=-1, num_train_epochs=epochs, learning_rate=3e-3, seed=1),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        # probes outside the training set, or 16 carved from it and still trained on (which the checks cache)
        neq_dataset=None if probes_in_train else token_dataset(16, seed=5),
        neq_config=NEqConfig(min_loss_drop=0, check_every=2, holdout_size=16, cache_frozen_prefix=cache),
    )
    trainer.train()
    return trainer


def test_the_last_epoch_runs_uncached_batches_without_the_cache(tmp_path, scripted_freezing):
    # one epoch: no sample is drawn twice, so no training batch goes through the cache, and the run is the run without
    # it, bit for bit (the frozen prefix keeps its dropout)
    cached = _epochs_run(tmp_path, "one", 1, "auto")
    stats = cached.neq_callback.engine.prefix_cache.stats
    assert stats["plain_batches"] > 0
    plain = _epochs_run(tmp_path, "one_plain", 1, False)
    params = dict(plain.model.named_parameters())
    for n, p in cached.model.named_parameters():
        assert torch.equal(params[n], p), n
    # two epochs: the second serves what the first stored
    two = _epochs_run(tmp_path, "two", 2, "auto").neq_callback.engine.prefix_cache
    assert two.stats["served"] > 0


def test_the_last_epoch_runs_batches_with_cached_probes_without_the_cache(tmp_path, scripted_freezing):
    # the checks cache the probes' states; with the probes in the training set, a batch holding some of them is served
    # only in part and runs the plain forward too: one epoch is still the run without the cache, bit for bit
    cached = _epochs_run(tmp_path, "one", 1, "auto", probes_in_train=True)
    cache = cached.neq_callback.engine.prefix_cache
    assert cache.peak["samples"] > 0 and cache.stats["served"] > 0  # the checks cached and read the probes
    assert cache.stats["plain_batches"] > 0
    plain = _epochs_run(tmp_path, "one_plain", 1, False, probes_in_train=True)
    params = dict(plain.model.named_parameters())
    for n, p in cached.model.named_parameters():
        assert torch.equal(params[n], p), n
