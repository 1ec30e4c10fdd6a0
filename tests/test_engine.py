"""The framework-free engine `neq_hf.NEq` in a custom Accelerate loop: same run as `NEqTrainer`, exact freezing, its
state through `accelerator.save_state`/`load_state`, re-sharding, the schedule and bad input (one process, CPU)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import pad_collator, paper_rule, tiny_classifier, token_dataset, unit_mask

from neq_hf import NEq, NEqConfig
from neq_hf.engine import resolve_schedule

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import neq_run  # noqa: E402  (the Trainer run of the multi-process tests)
import no_trainer_run  # noqa: E402  (the same run in a custom Accelerate loop)

# 16 steps, a check every 4, no dropout, data in order: the Trainer and the custom loop see the same batches, and eps
# is large enough that units freeze from step 8 on (whole tensors at step 12).
RUN = [
    "--eps",
    "0.15",
    "--max_steps",
    "16",
    "--check_every",
    "4",
    "--dropout",
    "0",
    "--sequential",
    "--batch_size",
    "8",
]


def load(out: Path) -> dict:
    return json.loads((out / "rank0.json").read_text())


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a / "final_state.pt"), torch.load(b / "final_state.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    """The custom loop, uninterrupted, saving its accelerate state at step 8."""
    out = tmp_path_factory.mktemp("loop")
    no_trainer_run.main(["--out", str(out), *RUN, "--save_at", "8"])
    return out


def test_custom_loop_matches_trainer_bit_for_bit(loop_run, tmp_path):
    neq_run.main(["--out", str(tmp_path), *RUN])
    trainer, loop = load(tmp_path), load(loop_run)
    assert [r["step"] for r in loop["records"]] == [0, 4, 8, 12, 16]
    for a, b in zip(trainer["records"], loop["records"]):
        assert (a["step"], a["digest"], a["phi"], a["v"]) == (b["step"], b["digest"], b["phi"], b["v"])
        assert a["params_digest"] == b["params_digest"]
    assert_same_weights(tmp_path, loop_run)


def test_custom_loop_freezes_exactly(loop_run):
    run = load(loop_run)
    assert run["engine"] == "single" and run["global_step"] == 16
    assert run["violations"] == [] and run["frozen_elements_checked"] > 10_000
    fractions = [r["frozen_fraction"] for r in run["records"]]
    assert fractions[:2] == [0.0, 0.0] and 0 < fractions[2] < 1 and fractions[-1] > fractions[2]
    trainable = [r["trainable_parameters"] for r in run["records"]]
    assert trainable[-1] < trainable[0]  # whole tensors switched off
    assert run["summary"]["checks"] == 4 and run["summary"]["final_frozen_fraction"] == fractions[-1]


def test_custom_loop_resume_with_accelerate_save_state(loop_run, tmp_path):
    # Interrupted at step 8 (a new process would start from here), then resumed from the saved state.
    no_trainer_run.main(["--out", str(tmp_path / "cut"), *RUN, "--save_at", "8", "--stop_at_save"])
    cut = tmp_path / "cut" / "step_8"
    assert (cut / "custom_checkpoint_0.pkl").is_file()
    no_trainer_run.main(["--out", str(tmp_path / "resumed"), *RUN, "--resume", str(cut)])
    full, resumed = load(loop_run), load(tmp_path / "resumed")
    by_step = {r["step"]: r for r in full["records"]}
    assert [r["step"] for r in resumed["records"]] == [8, 12, 16]
    for rec in resumed["records"]:
        expected = by_step[rec["step"]]
        assert (rec["digest"], rec["params_digest"], rec["phi"], rec["v"]) == (
            expected["digest"],
            expected["params_digest"],
            expected["phi"],
            expected["v"],
        )
    assert resumed["violations"] == []
    assert resumed["final_params_digest"] == full["final_params_digest"]
    assert_same_weights(loop_run, tmp_path / "resumed")


# -- the engine on its own ------------------------------------------------------------------------------------------
def engine(model, held=None, **kw) -> NEq:
    config = kw.pop("config", None) or paper_rule(
        eps=0.15,
        check_every=2,
        holdout_batch_size=5,
    )
    held = held if held is not None else token_dataset(24, seed=1234, with_labels=False)
    return NEq(model, config, held, data_collator=pad_collator, **kw)


def train_steps(model, neq: NEq, optimizer, steps: range, data) -> None:
    for step in steps:
        batch = pad_collator([data[i] for i in range(8 * step, 8 * step + 8)])
        model(**batch).loss.backward()
        neq.before_optimizer_step(optimizer)
        optimizer.step()
        neq.after_optimizer_step(optimizer)
        optimizer.zero_grad()
        neq.step_end(step + 1)


def test_state_dict_round_trip_restores_masks_and_freezing(tmp_path):
    data = token_dataset(96)
    model = tiny_classifier()
    neq = engine(model).setup(max_steps=12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    train_steps(model, neq, optimizer, range(8), data)
    assert 0 < neq.tracker.history[-1]["frozen_fraction"] < 1
    buffer = io.BytesIO()
    torch.save(neq.state_dict(), buffer)

    twin = tiny_classifier()
    twin.load_state_dict(model.state_dict())
    restored = engine(twin)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    restored.setup(max_steps=12)  # state loaded first: no new reference check
    a, b = neq.tracker, restored.tracker
    assert b.t == a.t and len(b.history) == len(a.history)
    for key in a.keys:
        assert torch.equal(a.frozen[key], b.frozen[key])
        assert torch.equal(a.phi[key], b.phi[key]) and torch.equal(a.v[key], b.v[key])
    assert all(torch.equal(a.reference[k], b.reference[k]) for k in a.keys)
    flags = [p.requires_grad for p in model.parameters()]
    assert [p.requires_grad for p in twin.parameters()] == flags and not all(flags)
    assert restored.freezer.stop_layer == neq.freezer.stop_layer
    assert restored.check_every == 2


def test_reference_is_resharded_for_another_number_of_processes():
    """A state saved by 2 processes loads into 1: the reference rows are put back in held-out order."""
    held = token_dataset(23, seed=5, with_labels=False)  # odd: the shards are uneven (12 and 11 samples)
    model = tiny_classifier()
    shards = [engine(model, held, process_index=r, num_processes=2).setup(max_steps=12) for r in (0, 1)]
    state = shards[0].state_dict()
    state["reference_shards"] = [s.state_dict()["reference_shards"][0] for s in shards]
    assert [len(s[0]) for s in state["reference_shards"]] == [12, 11]

    single = engine(model, held).setup(max_steps=12)
    own = {k: r.clone() for k, r in single.tracker.reference.items()}
    single.load_state_dict(state)
    for key, reference in own.items():
        # Same samples in the same order; batches are padded differently, hence float32 rounding only.
        torch.testing.assert_close(single.tracker.reference[key], reference, atol=1e-5, rtol=1e-5)

    with_loader = NEq(model, NEqConfig(min_loss_drop=0, check_every=2), holdout_dataloader=single.loader)
    with pytest.raises(ValueError, match="saved by 2 process"):
        with_loader.load_state_dict(state)


def test_optimizer_hooks_leave_accumulation_steps_alone():
    """Inside `accelerator.accumulate`, `optimizer.step()` is a no-op until gradients sync; so are the hooks."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    neq = engine(model).setup(max_steps=12)
    # Layer 0: 3 of 4 heads frozen, so the masked step handles Q/K/V.
    neq.freezer.apply({(0, "heads"): unit_mask(4, [0, 1, 2])})
    data = token_dataset(32)
    query = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    first = query.detach().clone()
    # Micro-steps 0 and 2 accumulate; 1 and 3 step (at 3 the optimizer state exists: the masked step runs).
    for micro, steps in ((0, False), (1, True), (2, False), (3, True)):
        before = query.detach().clone()
        with accelerator.accumulate(model):
            accelerator.backward(model(**pad_collator([data[i] for i in range(4 * micro, 4 * micro + 4)])).loss)
            neq.before_optimizer_step(optimizer)
            optimizer.step()
            neq.after_optimizer_step(optimizer)
            optimizer.zero_grad()
        assert (not torch.equal(query, before)) is steps, micro
        assert torch.equal(query[:24], first[:24])  # the frozen heads' rows (head_dim 8)


def test_schedule_resolution():
    assert resolve_schedule(NEqConfig(min_loss_drop=0, check_every="auto"), 100, None) == 5  # 20 checks per run
    assert resolve_schedule(NEqConfig(min_loss_drop=0, check_every="auto"), None, 3) == "epoch"
    assert resolve_schedule(NEqConfig(min_loss_drop=0, check_every=4), 16, None) == 4
    with pytest.raises(ValueError, match="check_every=50.*max_steps=60"):
        resolve_schedule(NEqConfig(min_loss_drop=0, check_every=50), 60, None)
    with pytest.raises(ValueError, match="num_train_epochs=1"):
        resolve_schedule(NEqConfig(min_loss_drop=0, check_every="epoch"), None, 1)


def test_check_budget_spaces_costly_checks():
    config = NEqConfig(min_loss_drop=0)  # check_budget 0.25
    # a check costing half a step: 20 checks every 5 steps cost 10% of the run, within the budget
    assert resolve_schedule(config, 100, None, check_cost_steps=0.5) == 5
    # 2.4 steps a check (64 held-out samples, LoRA batches of 16, measured on SmolLM2): widened to cost <= 25%
    assert resolve_schedule(config, 100, None, check_cost_steps=2.4) == 10
    assert resolve_schedule(config, 1000, None, check_cost_steps=2.4) == 50  # 20 checks cost less than that
    # but never below 5 checks per run
    assert resolve_schedule(config, 58, None, check_cost_steps=2.4) == 10
    assert resolve_schedule(config, 40, None, check_cost_steps=2.4) == 8
    assert resolve_schedule(config, 100, None, check_cost_steps=100.0) == 20
    # a budget exactly met is not exceeded
    assert resolve_schedule(config, 100, None, check_cost_steps=2.5) == 10
    # 0 disables it; explicit schedules and "epoch" are taken as given
    assert resolve_schedule(NEqConfig(min_loss_drop=0, check_budget=0), 100, None, check_cost_steps=2.4) == 5
    assert resolve_schedule(NEqConfig(min_loss_drop=0, check_every=3), 100, None, check_cost_steps=2.4) == 3
    assert resolve_schedule(config, None, 3, check_cost_steps=2.4) == "epoch"


def test_check_cost_is_estimated_from_sample_counts():
    from peft import LoraConfig, get_peft_model

    config = NEqConfig(min_loss_drop=0)
    held = token_dataset(24, seed=1234, with_labels=False)
    full = NEq(tiny_classifier(), config, held, data_collator=pad_collator, batch_size=5)
    assert full.check_cost_steps(None) is None
    assert full.check_cost_steps(8) == pytest.approx(24 / (3 * 8))  # forward + backward of every weight
    full.setup(max_steps=100, samples_per_step=8)
    assert full.check_every == 5 and full.summary()["check_cost_steps_estimate"] == pytest.approx(1.0)
    full.setup(max_steps=100, samples_per_step=2)  # 4 steps a check: every 16 steps keeps them at 25%
    assert full.check_every == 16
    lora = get_peft_model(tiny_classifier(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    held_lora = NEq(lora, config, held, data_collator=pad_collator, batch_size=5)
    assert held_lora.check_cost_steps(8) == pytest.approx(24 / (2 * 8))  # no weight gradient of the base model


def test_close_releases_the_model():
    model = tiny_classifier()
    neq = engine(
        model,
        config=paper_rule(eps=10.0, check_every=1),
    ).setup(max_steps=12)
    for step in (1, 2):
        neq.step_end(step)
    assert neq.summary()["final_frozen_fraction"] == 1.0
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layer." in n)
    neq.close()
    assert all(p.requires_grad for p in model.parameters())
    assert neq.summary()["final_frozen_fraction"] == 1.0  # the results stay readable


def test_bad_input():
    model = tiny_classifier()
    with pytest.raises(ValueError, match="exactly one of holdout_dataset"):
        NEq(model, NEqConfig(min_loss_drop=0))
    with pytest.raises(TypeError, match="NEqConfig"):
        NEq(model, {"eps": 1e-3}, token_dataset(8))


@pytest.fixture
def free_port_env(monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_ddp_wrapper_settings_are_checked(monkeypatch, free_port_env):
    """A custom loop hands NEq the DDP wrapper: find_unused_parameters=False or static_graph=True is refused."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import neq_hf.distributed as distributed

    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "_world_size", lambda args: 2)  # as if a second process ran beside
        with pytest.raises(ValueError, match=r"DistributedDataParallelKwargs\(find_unused_parameters=True\)"):
            engine(DistributedDataParallel(tiny_classifier()))
        with pytest.raises(ValueError, match="static_graph=True"):
            engine(DistributedDataParallel(tiny_classifier(), find_unused_parameters=True, static_graph=True))
        model = tiny_classifier()
        neq = engine(DistributedDataParallel(model, find_unused_parameters=True))
        assert neq.model is model  # held-out passes run the bare model, never DDP's forward
    finally:
        dist.destroy_process_group()
