"""NEq under several processes: DDP through `torchrun` on CPU (gloo), and the engines NEq refuses.

`accelerate launch --cpu` starts a single process, so the multi-process runs use ``python -m torch.distributed.run
--nproc_per_node 2`` on ``tests/distributed/neq_run.py``, whose probe callback checks at every NEq check that the
masks are the same on both processes, that everything frozen at the previous check is bit-identical, and that the
parameters are the same on both processes; it writes what it saw to ``rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import free_port, subprocess_env, tiny_classifier, training_args
from torch import nn

from neq_hf.distributed import (
    Engine,
    assert_same_masks,
    check_engine,
    detect_engine,
    gather_strings,
    mask_digest,
    tensor_digest,
)

SCRIPT = Path(__file__).parent / "distributed" / "neq_run.py"
TIMEOUT = 240  # a hang (e.g. DDP waiting for a gradient that never comes) fails the test instead of blocking it

# Settings shared by the BERT runs: 20 steps, a check every 4, eps large enough that whole tensors switch to
# requires_grad=False at step 12 and training goes on for 8 more steps.
BERT_RUN = ["--model", "bert", "--eps", "0.15", "--max_steps", "20", "--check_every", "4"]


def run_neq(out: Path, *options: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``neq_run.py`` under ``nproc`` processes (``torchrun``; plain python for one); kill it on timeout."""
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT),
        ]  # fmt: skip
    cmd += ["--out", str(out), *options]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        output, _ = proc.communicate()
        pytest.fail(f"NEq run hung for more than {TIMEOUT} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


def load_ranks(out: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Expected to have finished reduction" not in result.stdout


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """2 processes, tiny BERT (dropout on), a checkpoint at step 8."""
    out = tmp_path_factory.mktemp("bert_ddp")
    result = run_neq(out, *BERT_RUN, "--save_steps", "8")
    assert_ok(result)
    return out, load_ranks(out)


# -- DDP on two processes ----------------------------------------------------------------------------------------
def test_ddp_same_masks_and_frozen_parameters_unchanged(bert_run):
    _, ranks = bert_run
    r0, r1 = ranks
    assert (r0["engine"], r0["backend"], r0["world_size"]) == ("ddp", "gloo", 2)
    assert r0["global_step"] == r1["global_step"] == 20
    # The probe already compared the mask hashes across ranks at every check (it raises otherwise); same records.
    assert [r["step"] for r in r0["records"]] == [0, 4, 8, 12, 16, 20]
    assert [r["digest"] for r in r0["records"]] == [r["digest"] for r in r1["records"]]
    assert [r["frozen"] for r in r0["records"]] == [r["frozen"] for r in r1["records"]]
    # Frozen slices bit-identical from one check to the next, parameters identical on both processes.
    assert r0["violations"] == [] and r1["violations"] == []
    assert r0["frozen_elements_checked"] > 10_000
    assert r0["final_params_digest"] == r1["final_params_digest"]
    assert [r["params_digest"] for r in r0["records"]] == [r["params_digest"] for r in r1["records"]]


def test_ddp_progress_gate_agrees_across_processes(tmp_path):
    """Each process sees the loss of its own batches; the gate averages them over processes, so every process opens
    it at the same check (else the masks, and DDP's graph, would differ)."""
    result = run_neq(tmp_path, *BERT_RUN, "--min_loss_drop", "0.02")
    assert_ok(result)
    r0, r1 = load_ranks(tmp_path)
    assert r0["violations"] == [] and r1["violations"] == []
    for key in ("held", "loss_start", "gate_step", "digest"):
        assert [r[key] for r in r0["records"]] == [r[key] for r in r1["records"]], key
    held = [r["held"] for r in r0["records"][1:]]
    assert held[0] == 1 and r0["records"][-1]["loss_start"] is not None  # the first interval sets the start


def test_ddp_checks_wait_for_the_same_loss_on_every_process(tmp_path):
    """NEqConfig.checks_from_loss_drop: the checks start when the loss averaged over processes has dropped, so every
    process makes its reference check at the same step."""
    result = run_neq(tmp_path, *BERT_RUN, "--min_loss_drop", "0.005", "--checks_from_loss_drop", "0.002")
    assert_ok(result)
    r0, r1 = load_ranks(tmp_path)
    assert r0["violations"] == [] and r1["violations"] == []
    for key in ("step", "held", "loss_start", "gate_step", "digest"):
        assert [r[key] for r in r0["records"]] == [r[key] for r in r1["records"]], key
    assert r0["records"] and r0["records"][0]["step"] > 0  # no reference check at step 0


def test_ddp_movement_gate_agrees_across_processes(tmp_path):
    """NEqConfig.settle_fraction: the scale comes from the all-reduced similarity sums, so every process holds back
    the same checks and freezes the same units."""
    result = run_neq(tmp_path, *BERT_RUN, "--settle_fraction", "0.5")
    assert_ok(result)
    r0, r1 = load_ranks(tmp_path)
    assert r0["violations"] == [] and r1["violations"] == []
    for key in ("step", "settled", "digest", "params_digest"):
        assert [r[key] for r in r0["records"]] == [r[key] for r in r1["records"]], key
    settled = [r["settled"] for r in r0["records"][1:]]
    assert settled[0] == 0 and r0["records"][1]["frozen_fraction"] == 0  # first decision: the scale is its own peak
    assert 1 in settled and r0["records"][-1]["frozen_fraction"] > 0  # ... and freezing comes once it falls
    # nothing newly frozen at a check the gate held back
    for before, after in zip(r0["records"][1:], r0["records"][2:]):
        if after["settled"] == 0:
            assert all(a <= b for k in after["frozen"] for a, b in zip(after["frozen"][k], before["frozen"][k]))


def test_ddp_tensors_switched_to_no_grad_mid_training(bert_run):
    # Whole tensors leave DDP's graph while training goes on: without find_unused_parameters=True this raises
    # "Expected to have finished reduction" (or hangs) at the next backward.
    _, (r0, _) = bert_run
    trainable = [r["trainable_parameters"] for r in r0["records"]]
    assert trainable[0] > min(trainable[:-1])
    fractions = [r["frozen_fraction"] for r in r0["records"]]
    assert 0 < fractions[2] < 1 and fractions[-1] > fractions[2]
    masks = [r["frozen"] for r in r0["records"]]
    assert len({json.dumps(m) for m in masks[2:]}) > 1  # masks change from check to check


def test_ddp_resume_matches_uninterrupted_run(bert_run, tmp_path):
    out, ranks = bert_run
    result = run_neq(tmp_path, *BERT_RUN, "--save_steps", "8", "--resume", str(out / "checkpoint-8"))
    assert_ok(result)
    resumed = load_ranks(tmp_path)
    for full, again in zip(ranks, resumed):
        by_step = {r["step"]: r for r in full["records"]}
        assert [r["step"] for r in again["records"]] == [8, 12, 16, 20]
        for rec in again["records"]:
            assert rec["digest"] == by_step[rec["step"]]["digest"]
            assert rec["params_digest"] == by_step[rec["step"]]["params_digest"]
            assert rec["phi"] == by_step[rec["step"]]["phi"]
        assert again["violations"] == []
        assert again["final_params_digest"] == full["final_params_digest"]
    a, b = torch.load(out / "final_state.pt"), torch.load(tmp_path / "final_state.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~40 s; two processes deciding like one is also tested on the custom loop (test_no_trainer_distributed)
def test_two_processes_decide_like_one(tmp_path):
    """2 processes x batch 4 and 1 process x batch 8 see the same samples at each step (sequential order, no
    dropout): they train the same model up to float32 rounding, and NEq must take the same decisions.

    The held-out sums are additive, so the 2-process phi differs from the 1-process one only by rounding: each
    process pads its own held-out batches and the float32 per-batch sums are added in another order (measured:
    |d phi| <= 7e-7, |d v| <= 1.3e-6 over these 20 steps). Masks are compared exactly, except for a unit whose |v|
    lies within 1e-4 of eps, where rounding could legitimately tip the decision (none does in this run).
    """
    common = [*BERT_RUN, "--dropout", "0", "--sequential"]
    assert_ok(run_neq(tmp_path / "two", *common, "--batch_size", "4", nproc=2))
    assert_ok(run_neq(tmp_path / "one", *common, "--batch_size", "8", nproc=1))
    (two, _), (one,) = load_ranks(tmp_path / "two"), load_ranks(tmp_path / "one", 1)
    assert one["world_size"] == 1 and two["world_size"] == 2
    eps, tipping = 0.15, 0
    frozen_any = False
    for a, b in zip(one["records"], two["records"]):
        assert a["step"] == b["step"]
        for key in a["frozen"]:
            pa, pb = torch.tensor(a["phi"][key]), torch.tensor(b["phi"][key])
            va, vb = torch.tensor(a["v"][key]), torch.tensor(b["v"][key])
            assert torch.allclose(pa, pb, atol=1e-5, rtol=0, equal_nan=True), key
            assert torch.allclose(va, vb, atol=1e-5, rtol=0, equal_nan=True), key
            near = (va.abs() - eps).abs() < 1e-4
            fa, fb = torch.tensor(a["frozen"][key]), torch.tensor(b["frozen"][key])
            assert torch.equal(fa[~near], fb[~near]), (a["step"], key)
            tipping += int(near.sum())
            frozen_any |= bool(fa.any())
    assert frozen_any
    assert tipping == 0
    w1, w2 = torch.load(tmp_path / "one" / "final_state.pt"), torch.load(tmp_path / "two" / "final_state.pt")
    assert max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1) < 1e-4


def test_ddp_gqa_llama_checkpointing_everything_frozen(tmp_path):
    """Tiny Llama (4 query heads sharing 2 K/V heads) with non-reentrant activation checkpointing: at a large eps
    every unit freezes, backward stops above the last layer and only the classifier trains, on both processes."""
    # With checkpointing on, the Trainer gives DDP find_unused_parameters=False unless told otherwise (NEq refuses
    # that, see test_ddp_settings_that_cannot_freeze_are_refused).
    options = ["--model", "llama", "--eps", "0.5", "--max_steps", "16", "--activation_checkpointing"]
    assert_ok(run_neq(tmp_path, *options, "--ddp_find_unused_parameters", "true"))
    r0, r1 = load_ranks(tmp_path)
    assert r0["violations"] == [] and r1["violations"] == []
    assert [r["digest"] for r in r0["records"]] == [r["digest"] for r in r1["records"]]
    assert r0["final_params_digest"] == r1["final_params_digest"]
    last = r0["records"][-2]  # step 12: everything frozen, 4 steps still to train
    assert last["frozen_fraction"] == 1.0 and last["stop_layer"] == 2
    assert last["trainable_parameters"] == 32 + 32 * 2  # what runs above the layers: final norm, classifier


# -- engine detection and refusals, in process -------------------------------------------------------------------
def fake_args(**kw):
    base = dict(world_size=1, n_gpu=0, ddp_find_unused_parameters=None, ddp_static_graph=None)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_USE_", "FSDP_")):
            monkeypatch.delenv(key)
    return monkeypatch


def test_single_process_is_accepted(tmp_path, clean_env):
    args = training_args(tmp_path)
    assert detect_engine(args, tiny_classifier()) is Engine.SINGLE
    assert check_engine(args, tiny_classifier()) is Engine.SINGLE


def test_ddp_accepted_with_find_unused_parameters(clean_env):
    model = tiny_classifier()
    assert check_engine(fake_args(world_size=2), model) is Engine.DDP
    model.activation_checkpointing_enable()
    assert check_engine(fake_args(world_size=2, ddp_find_unused_parameters=True), model) is Engine.DDP


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ddp_find_unused_parameters=False), "find_unused_parameters=True"),
        (dict(activation_checkpointing=True), "activation checkpointing is on"),
        (dict(ddp_static_graph=True), "ddp_static_graph"),
        (
            dict(
                ddp_find_unused_parameters=True,
                activation_checkpointing=True,
                activation_checkpointing_kwargs={"use_reentrant": True},
            ),
            "use_reentrant",
        ),
    ],
)
def test_ddp_settings_that_cannot_freeze_are_refused(kwargs, message, clean_env):
    with pytest.raises(ValueError, match=message):
        check_engine(fake_args(world_size=2, **kwargs), tiny_classifier())


@pytest.mark.parametrize(
    "kwargs, env, engine",
    [
        (dict(fsdp=["full_shard"], fsdp_config={}), {}, Engine.FSDP1),
        (dict(), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, Engine.FSDP1),
        (dict(deepspeed="ds_config.json"), {}, Engine.DEEPSPEED),
        (dict(), {"ACCELERATE_USE_DEEPSPEED": "true"}, Engine.DEEPSPEED),
        (dict(n_gpu=2), {}, Engine.DATA_PARALLEL),
    ],
)
def test_sharding_engines_are_refused_with_an_alternative(kwargs, env, engine, clean_env):
    for key, value in env.items():
        clean_env.setenv(key, value)
    args = fake_args(world_size=2 if engine is not Engine.DATA_PARALLEL else 1, **kwargs)
    assert detect_engine(args, tiny_classifier()) is engine
    with pytest.raises(ValueError, match=f"under {engine.value}:.*Use DDP instead.*LoRA"):
        check_engine(args, tiny_classifier())


def test_wrappers_are_detected(clean_env):
    assert detect_engine(fake_args(), nn.DataParallel(tiny_classifier())) is Engine.DATA_PARALLEL
    sharded = nn.Linear(4, 4)
    sharded.tp_size = 2  # what transformers sets on a model loaded with tp_plan
    assert detect_engine(fake_args(world_size=2), sharded) is Engine.TENSOR_PARALLEL


# -- mask hashes -------------------------------------------------------------------------------------------------
def test_mask_digest():
    masks = {(0, "heads"): torch.tensor([True, False]), (0, "neurons"): torch.zeros(3, dtype=torch.bool)}
    same = {(0, "neurons"): torch.zeros(3, dtype=torch.bool), (0, "heads"): torch.tensor([True, False])}
    flipped = {**masks, (0, "neurons"): torch.tensor([False, False, True])}
    assert mask_digest(masks) == mask_digest(same) != mask_digest(flipped)
    assert len(mask_digest(masks)) == 64
    assert gather_strings("x") == ["x"]  # one process: nothing to gather
    assert assert_same_masks(masks) == mask_digest(masks)
    a = tiny_classifier()
    assert tensor_digest(a.named_parameters()) == tensor_digest(tiny_classifier().named_parameters())


# -- shipped Accelerate configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, distributed_type, for_neq",
    [
        ("multi_gpu", "MULTI_GPU", True),
        ("fsdp", "FSDP", True),
        ("fsdp2", "FSDP", True),
        ("deepspeed_zero2", "DEEPSPEED", False),
    ],
)
def test_accelerate_configs(name, distributed_type, for_neq):
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == distributed_type
    header = path.read_text().split("\n", 1)[0]
    assert ("NOT for NEq" not in header) == for_neq  # a refused engine says so on its first line
