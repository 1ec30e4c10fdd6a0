"""The held-out split: its size (floor, cap, refusals, warnings), per-token outputs, and the memory of the reference."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import pad_collator, tiny_classifier, token_dataset, training_args

import neq_hf.holdout as holdout
from neq_hf import NEqConfig, NEqTrainer, split_holdout
from neq_hf.holdout import (
    HoldoutTooSmallError,
    OutputRecorder,
    build_holdout_loader,
    count_reference_rows,
    holdout_count,
    length_grouped_batches,
    plan_reference,
    reference_width,
)
from neq_hf.tracker import EquilibriumTracker
from neq_hf.units import discover_units

FLOOR_WARNING = "fewer than NEqConfig.holdout_min_samples"


# -- size of the split ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, n_train, expected",
    [
        (0.01, 2000, 64),  # 20 samples raised to the floor
        (0.01, 96, 19),  # the floor as far as 20% of train allows
        (0.01, 256, 51),
        (0.05, 2000, 100),  # above the floor: as asked
        (0.5, 100_000, 2048),  # the cap
        (0.3, 100, 30),  # a fraction above 20% is not lowered
        (16, 96, 16),  # a count is taken as given, below the floor...
        (5000, 100_000, 5000),  # ...and above the cap
        (0.01, 10, 2),
    ],
)
def test_holdout_count(size, n_train, expected):
    assert holdout_count(size, n_train) == expected


def test_holdout_count_custom_floor_and_cap():
    assert holdout_count(0.01, 2000, min_samples=128) == 128
    assert holdout_count(0.01, 2000, min_samples=8) == 20
    assert holdout_count(0.5, 2000, min_samples=2, max_samples=100) == 100


@pytest.mark.parametrize("size, n_train", [(1, 96), (0.01, 5), (0.1, 9)])
def test_single_sample_is_refused(size, n_train):
    with pytest.raises(HoldoutTooSmallError, match="has 1 sample.*phi.*holdout_size"):
        holdout_count(size, n_train)


def test_empty_and_too_large_splits_are_refused():
    with pytest.raises(HoldoutTooSmallError, match="would be empty"):
        holdout_count(0.01, 4)
    with pytest.raises(ValueError, match="not smaller than the training set"):
        holdout_count(96, 96)


def test_split_holdout_uses_floor_and_cap():
    train, held = split_holdout(token_dataset(96), 0.01)
    assert (len(train), len(held)) == (77, 19)
    train, held = split_holdout(token_dataset(96), 0.5, min_samples=2, max_samples=10)
    assert (len(train), len(held)) == (86, 10)


def test_neq_trainer_carves_with_the_config_floor_and_cap(tmp_path):
    def carve(**config):
        return NEqTrainer(
            model=tiny_classifier("bert"),
            args=training_args(tmp_path / "out"),
            train_dataset=token_dataset(96),
            data_collator=pad_collator,
            neq_config=NEqConfig(min_loss_drop=0, check_every=2, **config),
        )

    assert len(carve().neq_dataset) == 19
    assert len(carve(holdout_min_samples=8).neq_dataset) == 8
    trainer = carve(holdout_size=0.5, holdout_min_samples=2, holdout_max_samples=12)
    assert (len(trainer.neq_dataset), len(trainer.train_dataset)) == (12, 96)  # kept in training (the default)
    trainer = carve(holdout_size=0.5, holdout_min_samples=2, holdout_max_samples=12, holdout_in_train=False)
    assert (len(trainer.neq_dataset), len(trainer.train_dataset)) == (12, 84)


def test_loader_warns_below_the_floor_and_refuses_one_sample(caplog):
    model = tiny_classifier("bert")
    with caplog.at_level(logging.WARNING, logger="neq_hf.holdout"):
        build_holdout_loader(token_dataset(10), model, pad_collator, 4, min_samples=64)
    assert sum(FLOOR_WARNING in r.getMessage() for r in caplog.records) == 1
    assert "only 10 samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neq_hf.holdout"):
        build_holdout_loader(token_dataset(64), model, pad_collator, 4, min_samples=64)
    assert FLOOR_WARNING not in caplog.text
    with pytest.raises(HoldoutTooSmallError, match="has 1 sample"):
        build_holdout_loader(token_dataset(1), model, pad_collator, 4, min_samples=64)


# -- token_pooling="none" against a hand-computed per-token cosine ---------------------------------------------------
def _hand_outputs(model, dataset, batch_size):
    """Every real token's input of each layer's attention output projection and MLP down projection, captured by
    hooks of this test (not the recorder's), samples one after the other; padding dropped sample by sample."""
    layers = model.bert.encoder.layer
    captured = {}
    handles = []
    for i, layer in enumerate(layers):
        for kind, module in (("heads", layer.attention.output.dense), ("neurons", layer.output.dense)):
            handles.append(module.register_forward_pre_hook(lambda m, a, k=(i, kind): captured.__setitem__(k, a[0])))
    out = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            feats = [dataset[j] for j in range(start, min(start + batch_size, len(dataset)))]
            model(**pad_collator(feats))
            for key, x in captured.items():
                for b, f in enumerate(feats):
                    out.setdefault(key, []).append(x[b, : len(f["input_ids"])].double())
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def _hand_phi(prev, cur, n_units):
    """One cosine per unit over all its per-token outputs (for a head: every token x every head dimension)."""
    p = prev.reshape(prev.shape[0], n_units, -1).transpose(0, 1).reshape(n_units, -1)
    c = cur.reshape(cur.shape[0], n_units, -1).transpose(0, 1).reshape(n_units, -1)
    return torch.stack([torch.dot(p[u], c[u]) / (p[u].norm() * c[u].norm()) for u in range(n_units)])


def _tracker_phi(model, dataset, pooling, batch_size, perturb):
    units = discover_units(model)
    config = NEqConfig(min_loss_drop=0, token_pooling=pooling)
    tracker = EquilibriumTracker(units, config)
    recorder = OutputRecorder(units, config.unit_kinds, pooling)
    loader = build_holdout_loader(dataset, model, pad_collator, batch_size)
    tracker.reference_rows = count_reference_rows(loader, pooling)

    def run_pass(on_batch):
        recorder.run(model, loader, torch.device("cpu"), on_batch)

    tracker.check(run_pass)
    perturb()
    tracker.check(run_pass)
    return tracker


def test_token_pooling_none_matches_a_hand_per_token_cosine():
    torch.manual_seed(0)
    model = tiny_classifier("bert", seed=1)
    dataset = token_dataset(11, seed=2, with_labels=False, min_len=3, max_len=15)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: 0.05 * torch.randn_like(p) for n, p in state.items()}

    def perturb():
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n] + delta[n])

    def reset():
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])

    prev = _hand_outputs(model, dataset, 4)
    perturb()
    cur = _hand_outputs(model, dataset, 4)
    reset()
    tracker = _tracker_phi(model, dataset, "none", 4, perturb)
    real_tokens = sum(len(x["input_ids"]) for x in dataset)
    units = discover_units(model)
    for key in tracker.keys:
        n = units.layers[key[0]].num_units(key[1])
        hand = _hand_phi(prev[key], cur[key], n)
        assert 0 < float((1 - hand).min()), "the perturbation should move every unit"
        torch.testing.assert_close(tracker.phi[key].double(), hand, atol=2e-6, rtol=0)
        # the reference now holds every real token of the last check, in order
        assert tracker.reference[key].shape[0] == real_tokens
        torch.testing.assert_close(tracker.reference[key].double(), cur[key], atol=1e-6, rtol=0)

    # Padding never counts: one sample per batch (no padding at all) gives the same similarities.
    reset()
    unpadded = _tracker_phi(model, dataset, "none", 1, perturb)
    for key in tracker.keys:
        torch.testing.assert_close(unpadded.phi[key], tracker.phi[key], atol=2e-6, rtol=0)

    # The per-sample mean is a different vector: the test would see "none" behaving like "mean".
    reset()
    pooled = _tracker_phi(model, dataset, "mean", 4, perturb)
    differs = max(float((pooled.phi[k] - tracker.phi[k]).abs().max()) for k in tracker.keys)
    assert differs > 1e-3


def test_token_pooling_none_shards_add_up_to_the_single_process_phi():
    """Two processes each keep the tokens of their samples; the all-reduced sums give the single-process phi."""
    import copy
    import threading

    model = tiny_classifier("bert", seed=1)
    dataset = token_dataset(11, seed=2, with_labels=False, min_len=3, max_len=15)
    torch.manual_seed(0)
    delta = {n: 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    models = [copy.deepcopy(model) for _ in range(3)]  # single process, rank 0, rank 1

    def perturb(m):
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(delta[n])

    trackers, passes = [], []
    for m, (rank, world) in zip(models, [(0, 1), (0, 2), (1, 2)]):
        units = discover_units(m)
        config = NEqConfig(min_loss_drop=0, token_pooling="none")
        tracker = EquilibriumTracker(units, config)
        recorder = OutputRecorder(units, config.unit_kinds, "none")
        loader = build_holdout_loader(dataset, m, pad_collator, 3, rank, world)
        tracker.reference_rows = count_reference_rows(loader, "none")
        run = (lambda r, mm, ld: lambda on_batch: r.run(mm, ld, torch.device("cpu"), on_batch))(recorder, m, loader)
        tracker.check(run)
        perturb(m)
        trackers.append(tracker)
        passes.append(run)
    assert trackers[1].reference_rows + trackers[2].reference_rows == trackers[0].reference_rows
    trackers[0].check(passes[0])

    barrier, flats = threading.Barrier(2), [None, None]

    def reduce_for(rank):
        def reduce(flat):
            flats[rank] = flat
            barrier.wait()
            return flats[0] + flats[1]

        return reduce

    threads = [threading.Thread(target=trackers[1 + r].check, args=(passes[1 + r], reduce_for(r))) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in trackers[0].keys:
        torch.testing.assert_close(trackers[1].phi[key], trackers[0].phi[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(trackers[2].phi[key], trackers[0].phi[key], atol=1e-6, rtol=0)


# -- memory of the reference ----------------------------------------------------------------------------------------
def _setup(pooling, n=13, batch_size=4, kinds=("heads", "neurons"), model_type="bert"):
    model = tiny_classifier(model_type)
    units = discover_units(model)
    config = NEqConfig(min_loss_drop=0, token_pooling=pooling, unit_kinds=list(kinds))
    dataset = token_dataset(n, seed=3, with_labels=False)
    loader = build_holdout_loader(dataset, model, pad_collator, batch_size)
    return model, units, config, dataset, loader


@pytest.mark.parametrize("pooling", ["mean", "none"])
@pytest.mark.parametrize("kinds", [("heads", "neurons"), ("neurons",)])
@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_memory_estimate_equals_the_reference_bytes(pooling, kinds, model_type):
    model, units, config, dataset, loader = _setup(pooling, kinds=kinds, model_type=model_type)
    rows = plan_reference(loader, units, config.unit_kinds, pooling, torch.device("cpu"), budget_mb=None)
    expected_rows = len(dataset) if pooling == "mean" else sum(len(x["input_ids"]) for x in dataset)
    assert rows == expected_rows
    width = sum(
        (layer.num_heads * layer.head_dim if "heads" in kinds else 0)
        + (layer.num_neurons if "neurons" in kinds else 0)
        for layer in units.layers
    )
    assert reference_width(units, config.unit_kinds) == width
    tracker = EquilibriumTracker(units, config)
    tracker.reference_rows = rows
    recorder = OutputRecorder(units, config.unit_kinds, pooling)
    tracker.check(lambda on_batch: recorder.run(model, loader, torch.device("cpu"), on_batch))
    assert tracker.reference_bytes() == 4 * rows * width


def test_reference_is_written_into_one_preallocated_tensor():
    model, units, config, _, loader = _setup("none", n=13, batch_size=3)
    tracker = EquilibriumTracker(units, config)
    tracker.reference_rows = count_reference_rows(loader, "none")
    recorder = OutputRecorder(units, config.unit_kinds, "none")
    seen = []

    def run_pass(on_batch):
        def spy(start, pooled):
            on_batch(start, pooled)
            seen.append({k: (r.data_ptr(), tuple(r.shape)) for k, r in tracker.reference.items()})

        recorder.run(model, loader, torch.device("cpu"), spy)

    tracker.check(run_pass)
    assert len(seen) == 5  # batches
    final = {k: (r.data_ptr(), tuple(r.shape)) for k, r in tracker.reference.items()}
    assert all(s == final for s in seen), "the reference must be allocated once, at its final size"
    assert all(shape[0] == tracker.reference_rows for _, shape in final.values())
    # later checks write into the same storage
    tracker.check(run_pass)
    assert {k: (r.data_ptr(), tuple(r.shape)) for k, r in tracker.reference.items()} == final


def test_a_changed_held_out_split_is_refused():
    model, units, config, dataset, loader = _setup("mean", n=13)
    tracker = EquilibriumTracker(units, config)
    tracker.reference_rows = count_reference_rows(loader, "mean")
    recorder = OutputRecorder(units, config.unit_kinds)
    tracker.check(lambda on_batch: recorder.run(model, loader, torch.device("cpu"), on_batch))
    for smaller_or_larger in (10, 17):
        other = build_holdout_loader(token_dataset(smaller_or_larger, seed=3), model, pad_collator, 4)
        with pytest.raises(ValueError, match="output rows but the reference outputs have 13"):
            tracker.check(lambda on_batch, other=other: recorder.run(model, other, torch.device("cpu"), on_batch))


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_reference_above_the_budget_is_refused(pooling):
    _, units, config, _, loader = _setup(pooling)
    with pytest.raises(
        ValueError, match=r"4 B x \d+ .*= [\d.]+ KiB.*NEqConfig\.holdout_memory_budget_mb=0\.001"
    ) as error:
        plan_reference(loader, units, config.unit_kinds, pooling, torch.device("cpu"), budget_mb=0.001)
    assert "holdout_max_samples" in str(error.value)
    assert ("token_pooling='mean'" in str(error.value)) == (pooling == "none")


def test_reference_warns_above_a_fraction_of_available_memory(monkeypatch, caplog):
    _, units, config, _, loader = _setup("mean")
    nbytes = 4 * count_reference_rows(loader) * reference_width(units, config.unit_kinds)
    monkeypatch.setattr(holdout, "available_memory", lambda device: int(nbytes / holdout.MEMORY_WARN_FRACTION) - 1)
    with caplog.at_level(logging.WARNING, logger="neq_hf.holdout"):
        plan_reference(loader, units, config.unit_kinds, "mean", torch.device("cpu"), budget_mb=None)
    assert "available on cpu" in caplog.text and "4 B x 13 held-out samples" in caplog.text
    caplog.clear()
    monkeypatch.setattr(holdout, "available_memory", lambda device: int(nbytes / holdout.MEMORY_WARN_FRACTION) + 1)
    with caplog.at_level(logging.WARNING, logger="neq_hf.holdout"):
        plan_reference(loader, units, config.unit_kinds, "mean", torch.device("cpu"), budget_mb=None)
    assert caplog.text == ""


def test_available_memory_on_cpu():
    available = holdout.available_memory(torch.device("cpu"))
    assert available is not None and available > 2**20
    assert holdout.available_memory(torch.device("meta")) is None


# -- through NEqTrainer ---------------------------------------------------------------------------------------------
def _train(tmp_path, max_steps=4, **config):
    trainer = NEqTrainer(
        model=tiny_classifier("bert"),
        args=training_args(tmp_path / "out", max_steps=max_steps),
        train_dataset=token_dataset(96),
        data_collator=pad_collator,
        neq_config=NEqConfig(min_loss_drop=0, check_every=2, **config),
    )
    trainer.train()
    return trainer


def test_trainer_warns_once_and_reports_the_held_out_size(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="neq_hf"):
        trainer = _train(tmp_path, max_steps=6)
    assert sum(FLOOR_WARNING in r.getMessage() for r in caplog.records) == 1
    assert trainer.neq_callback.tracker.reference_rows == 19
    assert trainer.neq_summary()["holdout_samples"] == 19


def test_trainer_with_token_pooling_none(tmp_path):
    trainer = _train(
        tmp_path,
        token_pooling="none",
        holdout_size=24,
        criterion="absolute",
        layer_threshold=1.0,
        granularity="unit",
        eps=1.0,
    )
    tokens = sum(len(x) for x in trainer.neq_dataset["input_ids"])
    tracker = trainer.neq_callback.tracker
    assert tracker.reference_rows == tokens
    assert all(r.shape[0] == tokens for r in tracker.reference.values())
    assert trainer.neq_summary()["final_frozen_fraction"] == 1.0  # eps=1.0: the decisions ran on per-token phi


def test_trainer_refuses_a_reference_above_the_budget(tmp_path):
    with pytest.raises(ValueError, match="holdout_memory_budget_mb=0.001"):
        _train(tmp_path, holdout_memory_budget_mb=0.001)


def test_per_token_reference_is_not_resharded_over_another_process_count():
    from neq_hf.engine import NEq

    dataset = token_dataset(12, seed=3, with_labels=False)
    neq = NEq(
        tiny_classifier("bert"), NEqConfig(min_loss_drop=0, token_pooling="none"), dataset, data_collator=pad_collator
    )
    neq.setup(max_steps=10)
    state = neq.state_dict()
    assert len(state["reference_shards"]) == 1
    state["reference_shards"] = state["reference_shards"] * 2  # as if saved by two processes
    with pytest.raises(ValueError, match="token_pooling='none'.*same number of processes"):
        neq.load_state_dict(state)


@pytest.mark.parametrize("budget", [0, -1.0, True, "big"])
def test_memory_budget_is_validated(budget):
    with pytest.raises(ValueError, match="holdout_memory_budget_mb"):
        NEqConfig(min_loss_drop=0, holdout_memory_budget_mb=budget)
    assert NEqConfig(min_loss_drop=0, holdout_memory_budget_mb=None).holdout_memory_budget_mb is None


# -- length-grouped held-out batches --------------------------------------------------------------------------------
def test_length_grouped_batches_by_hand():
    lengths = [9, 2, 30, 3, 2, 10, 4, 28]  # mean 11, batch 4 -> at most 4 samples and 44 padded tokens a batch
    # ascending (ties by position): 1(2) 4(2) 3(3) 6(4) | 0(9) 5(10) [3 x 28 = 84 > 44] | 7(28) | 2(30)
    assert length_grouped_batches(lengths, 4) == [[1, 4, 3, 6], [0, 5], [7], [2]]
    assert length_grouped_batches(lengths, 1) == [[1], [4], [3], [6], [0], [5], [7], [2]]
    assert length_grouped_batches([5, 5, 5, 5, 5], 2) == [[0, 1], [2, 3], [4]]  # equal lengths: plain batches
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        length_grouped_batches([3], 0)


def test_length_grouped_loader_pads_less_and_covers_every_sample_once():
    model = tiny_classifier("bert")
    dataset = token_dataset(40, seed=5, with_labels=False, min_len=2, max_len=30)
    plain = list(build_holdout_loader(dataset, model, pad_collator, 8))
    grouped = list(build_holdout_loader(dataset, model, pad_collator, 8, group_by_length=True))
    padded = [sum(b["input_ids"].numel() for b in loader) for loader in (plain, grouped)]
    assert padded[1] < 0.75 * padded[0]
    mean = sum(len(x["input_ids"]) for x in dataset) / len(dataset)
    assert all(b["input_ids"].shape[0] <= 8 and b["input_ids"].numel() <= 8 * -(-mean // 1) for b in grouped)
    rows = sorted(
        tuple(ids[mask.bool()].tolist()) for b in grouped for ids, mask in zip(b["input_ids"], b["attention_mask"])
    )
    assert rows == sorted(tuple(x["input_ids"]) for x in dataset)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_length_grouped_checks_give_the_same_similarity(pooling):
    """The batching changes the padding, not a unit's outputs: phi per unit equals the plain loader's."""
    dataset = token_dataset(23, seed=6, with_labels=False, min_len=2, max_len=24)
    trackers = []
    for grouped in (False, True):
        model = tiny_classifier("bert", seed=1)
        units = discover_units(model)
        config = NEqConfig(min_loss_drop=0, token_pooling=pooling)
        tracker = EquilibriumTracker(units, config)
        recorder = OutputRecorder(units, config.unit_kinds, pooling)
        loader = build_holdout_loader(dataset, model, pad_collator, 5, group_by_length=grouped)
        tracker.reference_rows = count_reference_rows(loader, pooling)

        def run_pass(on_batch, model=model, recorder=recorder, loader=loader):
            recorder.run(model, loader, torch.device("cpu"), on_batch)

        tracker.check(run_pass)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tracker.check(run_pass)
        trackers.append(tracker)
    for key in trackers[0].keys:
        assert not torch.equal(trackers[0].phi[key], torch.ones_like(trackers[0].phi[key]))
        torch.testing.assert_close(trackers[1].phi[key], trackers[0].phi[key], atol=1e-5, rtol=0)
