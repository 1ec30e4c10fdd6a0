"""NEq under FSDP2 (``fully_shard``, DTensor parameters sharded by rows) on two CPU processes (gloo): in a custom
loop sharded by hand and in the Trainer through Accelerate's FSDP2 plugin.

What must hold: everything NEq froze is bit-identical on every shard from one check to the next (whole tensors,
partly frozen rows and their optimizer state, written back on each process's local shard), training goes on for the
rest, both processes hold the same masks, and the decisions are those of a DDP run on the same data (measured: the
same phi and velocity bit for bit on BERT; final Llama weights within 1e-7 of DDP's, from the order of the reductions).
The held-out split is uneven (3 batches on one process, 2 on the other): the process with fewer runs a padding forward,
whose outputs are ignored, so that both run as many sharded forwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_classifier
from test_distributed import assert_ok, load_ranks, run_neq
from test_no_trainer_distributed import run_loop

from neq_hf.distributed import Engine, check_engine, detect_engine

# 21 held-out samples in batches of 5: 3 batches on process 0 (11 samples), 2 on process 1 (10).
COMMON = ["--eps", "0.15", "--max_steps", "16", "--check_every", "4", "--dropout", "0", "--sequential"]
COMMON += [
    "--holdout_samples",
    "21",
    "--batch_size",
    "4",
    "--fused",
    "false",
]  # FSDP2 runs the for-loop AdamW: so does the DDP reference


def assert_frozen_exact(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["engine"] == "fsdp2" and r0["world_size"] == 2
    assert r0["violations"] == [] and r1["violations"] == []
    assert r0["frozen_elements_checked"] > 10_000
    assert [r["digest"] for r in r0["records"]] == [r["digest"] for r in r1["records"]]
    assert r0["final_params_digest"] == r1["final_params_digest"]
    # Training goes on: the parameters change between checks; whole tensors leave the backward graph.
    params = [r["params_digest"] for r in r0["records"]]
    assert len(set(params)) == len(params)
    trainable = [r["trainable_parameters"] for r in r0["records"]]
    assert trainable[-1] < trainable[0]
    fractions = [r["frozen_fraction"] for r in r0["records"]]
    assert 0 < fractions[2] < 1


def assert_same_decisions(a: dict, b: dict) -> None:
    assert [r["step"] for r in a["records"]] == [r["step"] for r in b["records"]]
    for x, y in zip(a["records"], b["records"]):
        assert x["frozen"] == y["frozen"], x["step"]
        for key in x["phi"]:
            torch.testing.assert_close(torch.tensor(x["phi"][key]), torch.tensor(y["phi"][key]), atol=1e-6, rtol=0,
                                       equal_nan=True)  # fmt: skip


def final_weights_close(a: Path, b: Path, atol: float) -> None:
    wa, wb = torch.load(a / "final_state.pt"), torch.load(b / "final_state.pt")
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= atol


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    fsdp, ddp = tmp_path_factory.mktemp("fsdp2_bert"), tmp_path_factory.mktemp("ddp_bert")
    assert_ok(run_loop(fsdp, *COMMON, "--fsdp2"))
    assert_ok(run_loop(ddp, *COMMON))
    return fsdp, ddp


def test_custom_loop_fsdp2_freezes_rows_exactly_on_every_shard(bert):
    fsdp, _ = bert
    assert_frozen_exact(load_ranks(fsdp))


def released_units(run: dict) -> int:
    """Units frozen at one check and trainable again at the next."""
    records = run["records"]
    return sum(
        int(x == 1 and y == 0)
        for a, b in zip(records, records[1:])
        for key in a["frozen"]
        for x, y in zip(a["frozen"][key], b["frozen"][key])
    )


def test_custom_loop_fsdp2_decides_like_ddp(bert):
    """Same decisions and the same weights as DDP, units released along the way included: a released unit resumes
    from the parameters and optimizer state it had when it froze, on every shard."""
    fsdp, ddp = bert
    run = load_ranks(fsdp)[0]
    assert_same_decisions(load_ranks(ddp)[0], run)
    assert released_units(run) > 0
    final_weights_close(fsdp, ddp, atol=1e-6)


def test_trainer_fsdp2_plugin(bert, tmp_path):
    """The Trainer with Accelerate's FSDP2 plugin (it wraps every layer, then the model): same masks as the custom
    loop's FSDP2 run on the same data."""
    fsdp, _ = bert
    assert_ok(run_neq(tmp_path, *COMMON[:-2], "--fsdp", "2"))
    ranks = load_ranks(tmp_path)
    assert_frozen_exact(ranks)
    assert [r["digest"] for r in ranks[0]["records"]] == [r["digest"] for r in load_ranks(fsdp)[0]["records"]]


@pytest.mark.slow  # ~2 min
def test_trainer_fsdp2_resume_from_sharded_checkpoint(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert_ok(run_neq(full, *COMMON[:-2], "--fsdp", "2", "--save_steps", "8"))
    assert_ok(run_neq(resumed, *COMMON[:-2], "--fsdp", "2", "--resume", str(full / "checkpoint-8")))
    for a, b in zip(load_ranks(full), load_ranks(resumed)):
        by_step = {r["step"]: r for r in a["records"]}
        assert [r["step"] for r in b["records"]] == [8, 12, 16]
        for rec in b["records"]:
            expected = by_step[rec["step"]]
            assert (rec["digest"], rec["params_digest"], rec["phi"]) == (
                expected["digest"],
                expected["params_digest"],
                expected["phi"],
            )
        assert b["violations"] == [] and b["final_params_digest"] == a["final_params_digest"]


@pytest.mark.slow  # ~2 min
def test_custom_loop_fsdp2_llama_gqa(tmp_path):
    """Tiny Llama, 4 query heads sharing 2 K/V heads: a K/V row freezes only with both of its query heads."""
    options = [*COMMON, "--model", "llama", "--eps", "0.05"]
    assert_ok(run_loop(tmp_path / "fsdp", *options, "--fsdp2"))
    assert_ok(run_loop(tmp_path / "ddp", *options))
    ranks = load_ranks(tmp_path / "fsdp")
    assert_frozen_exact(ranks)
    assert_same_decisions(load_ranks(tmp_path / "ddp")[0], ranks[0])
    final_weights_close(tmp_path / "fsdp", tmp_path / "ddp", atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, env",
    [
        (dict(fsdp=["full_shard"], fsdp_config={"version": 2}), {}),
        (dict(), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
    ],
)
def test_fsdp2_is_accepted(kwargs, env, monkeypatch):
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from test_distributed import fake_args

    args = fake_args(world_size=2, **kwargs)
    assert detect_engine(args, tiny_classifier()) is Engine.FSDP2
    assert check_engine(args, tiny_classifier()) is Engine.FSDP2


def test_ddp_wrapper_wins_over_fsdp_settings(monkeypatch):
    """Accelerate's FSDP plugin is not applied on CPU (the model gets DDP), but it leaves ACCELERATE_USE_FSDP set:
    the wrapper that is actually there decides."""
    import torch.distributed as dist
    from conftest import free_port
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert detect_engine(None, DistributedDataParallel(tiny_classifier())) is Engine.DDP
        assert detect_engine(None, tiny_classifier()) is Engine.FSDP1  # a bare model: the settings are all there is
    finally:
        dist.destroy_process_group()


@pytest.fixture
def one_process_group(monkeypatch):
    import torch.distributed as dist
    from conftest import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_classifier():
    from torch.distributed.fsdp import fully_shard

    model = tiny_classifier()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    return model


def test_sharded_freezer_in_one_process(one_process_group):
    """FSDP2 in one process: the engine picks the sharded freezer, and a partly frozen weight's frozen rows and their
    AdamW state stay bit-identical on the (local) shard while the other rows train."""
    from conftest import pad_collator, token_dataset, unit_mask

    from neq_hf import NEq, NEqConfig
    from neq_hf.distributed import ShardedFreezer

    model = sharded_classifier()
    neq = NEq(
        model,
        NEqConfig(min_loss_drop=0, check_every=2),
        token_dataset(24, seed=1, with_labels=False),
        data_collator=pad_collator,
    )
    assert neq.sharded and isinstance(neq.freezer, ShardedFreezer)
    neq.setup(max_steps=12)
    neq.freezer.apply({(0, "heads"): unit_mask(4, [0, 1, 2])})  # rows 0..23 of Q, K, V in layer 0
    query = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = token_dataset(32)
    first, before_active, states = query.to_local()[:24].clone(), query.to_local()[24:].clone(), None
    for step in range(3):
        model(**pad_collator([data[i] for i in range(8 * step, 8 * step + 8)])).loss.backward()
        neq.before_optimizer_step(optimizer)
        optimizer.step()
        neq.after_optimizer_step(optimizer)
        optimizer.zero_grad()
        local = query.to_local()
        state = {k: v.to_local()[:24].clone() for k, v in optimizer.state[query].items() if k != "step"}
        if states is None:  # created by the first step: zero in the frozen rows, and kept so
            states = state
            assert all(not s.any() for s in states.values())
        assert torch.equal(local[:24], first)
        assert all(torch.equal(state[k], states[k]) for k in states)
    assert not torch.equal(query.to_local()[24:], before_active)  # the active head trains
    neq.close()


def test_prefix_cache_refused_under_fsdp2(one_process_group):
    from conftest import pad_collator, token_dataset

    from neq_hf import NEq, NEqConfig

    with pytest.raises(ValueError, match="cache_frozen_prefix is not supported under FSDP2"):
        NEq(
            sharded_classifier(),
            NEqConfig(min_loss_drop=0, cache_frozen_prefix=True),
            token_dataset(8),
            data_collator=pad_collator,
        )
