"""NEq in a custom Accelerate loop under two CPU processes (``torchrun``, gloo, DDP): the same decisions as one
process, frozen parameters bit-identical on both, resume through ``accelerator.save_state``/``load_state`` (with two
processes, and with one: the reference outputs are re-sharded), and DDP settings NEq cannot train under.

The runs are ``tests/distributed/no_trainer_run.py``; see ``test_distributed.py`` for the same checks on the Trainer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, subprocess_env
from test_distributed import TIMEOUT, assert_ok, load_ranks

SCRIPT = Path(__file__).parent / "distributed" / "no_trainer_run.py"
EPS = 0.15
# No dropout and data in order: 2 processes x batch 4 see the same samples per step as 1 process x batch 8.
COMMON = ["--eps", str(EPS), "--max_steps", "16", "--check_every", "4", "--dropout", "0", "--sequential"]


def run_loop(out: Path, *options: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``no_trainer_run.py`` under ``nproc`` processes (``torchrun``; plain python for one); kill it on timeout."""
    cmd = [sys.executable, str(SCRIPT)]
    if nproc > 1:
        cmd[1:1] = [
            "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two, one = tmp_path_factory.mktemp("loop_two"), tmp_path_factory.mktemp("loop_one")
    assert_ok(run_loop(two, *COMMON, "--batch_size", "4", "--save_at", "8"))
    assert_ok(run_loop(one, *COMMON, "--batch_size", "8", nproc=1))
    return two, one


def assert_same_decisions(one: dict, two: dict, from_step: int = 0) -> None:
    """Masks equal and phi/v equal up to float32 rounding (the held-out sums add up in another order across
    processes); a unit whose |v| lies within 1e-4 of eps could legitimately tip, and none does here."""
    records = [r for r in one["records"] if r["step"] >= from_step]
    assert [r["step"] for r in records] == [r["step"] for r in two["records"]]
    for a, b in zip(records, two["records"]):
        for key in a["frozen"]:
            va, vb = torch.tensor(a["v"][key]), torch.tensor(b["v"][key])
            torch.testing.assert_close(torch.tensor(a["phi"][key]), torch.tensor(b["phi"][key]), atol=1e-5, rtol=0,
                                       equal_nan=True)  # fmt: skip
            torch.testing.assert_close(va, vb, atol=1e-5, rtol=0, equal_nan=True)
            assert not ((va.abs() - EPS).abs() < 1e-4).any()
            assert a["frozen"][key] == b["frozen"][key], (a["step"], key)


def test_two_processes_same_masks_at_every_check_as_one(runs):
    two, one = runs
    r0, r1 = load_ranks(two)
    (single,) = load_ranks(one, 1)
    assert (r0["engine"], r0["backend"], r0["world_size"], single["world_size"]) == ("ddp", "gloo", 2, 1)
    assert [r["step"] for r in r0["records"]] == [0, 4, 8, 12, 16]
    assert [r["digest"] for r in r0["records"]] == [r["digest"] for r in r1["records"]]
    assert_same_decisions(single, r0)
    fractions = [r["frozen_fraction"] for r in r0["records"]]
    assert 0 < fractions[2] < 1 and fractions[-1] > fractions[2]
    w1, w2 = torch.load(one / "final_state.pt"), torch.load(two / "final_state.pt")
    assert max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1) < 1e-4


def test_two_processes_frozen_parameters_bit_identical(runs):
    two, _ = runs
    r0, r1 = load_ranks(two)
    assert r0["violations"] == [] and r1["violations"] == []
    assert r0["frozen_elements_checked"] > 10_000
    assert [r["params_digest"] for r in r0["records"]] == [r["params_digest"] for r in r1["records"]]
    assert r0["final_params_digest"] == r1["final_params_digest"]
    trainable = [r["trainable_parameters"] for r in r0["records"]]
    assert trainable[-1] < trainable[0]  # whole tensors left DDP's graph mid-run


def test_two_processes_resume_from_saved_state(runs, tmp_path):
    two, _ = runs
    assert_ok(run_loop(tmp_path, *COMMON, "--batch_size", "4", "--resume", str(two / "step_8")))
    for full, again in zip(load_ranks(two), load_ranks(tmp_path)):
        by_step = {r["step"]: r for r in full["records"]}
        assert [r["step"] for r in again["records"]] == [8, 12, 16]
        for rec in again["records"]:
            expected = by_step[rec["step"]]
            assert (rec["digest"], rec["params_digest"], rec["phi"]) == (
                expected["digest"],
                expected["params_digest"],
                expected["phi"],
            )
        assert again["violations"] == [] and again["final_params_digest"] == full["final_params_digest"]


def test_state_of_two_processes_resumes_on_one(runs, tmp_path):
    """NEq's checkpoint holds every process's shard of the reference outputs: one process takes them all back, in
    held-out order, and decides as the two-process run did."""
    two, _ = runs
    assert_ok(run_loop(tmp_path, *COMMON, "--batch_size", "8", "--resume", str(two / "step_8"), nproc=1))
    (resumed,) = load_ranks(tmp_path, 1)
    r0, _ = load_ranks(two)
    assert resumed["violations"] == []
    assert_same_decisions(r0, resumed, from_step=8)
