"""benchmarks/targets.py: verdicts and the time profile from result files (synthetic ones here, nothing is run)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import targets  # noqa: E402


def _run(task, method, seed, accuracy, cpu, summary=None):
    run = {"task": task, "method": method, "seed": seed, "max_seq_length": 64, "metrics": {"accuracy": accuracy},
           "train_cpu_seconds": cpu, "train_steps": 126}  # fmt: skip
    if summary is not None:
        run["neq"] = {"summary": summary}
    return run


@pytest.fixture
def results(tmp_path):
    summary = {"average_per_layer/neurons": {"0": 0.5, "1": 0.25, "2": 0.0}, "check_time_fraction": 0.05,
               "gate_step": 36}  # fmt: skip
    grid = tmp_path / "glue"
    write_results(grid, [
        _run("sst2", "full", 0, 0.800, 100.0), _run("sst2", "full", 1, 0.790, 100.0),
        # 0.84x, -0.4 points: met
        _run("sst2", "neq", 0, 0.795, 84.0, summary), _run("sst2", "neq", 1, 0.787, 84.0, summary),
        # faster but 0.2 points above neq: dominates it
        _run("sst2", "freeze_bottom2", 0, 0.794, 80.0), _run("sst2", "freeze_bottom2", 1, 0.792, 80.0),
        # faster but less accurate: does not
        _run("sst2", "freeze_bottom3", 0, 0.770, 70.0), _run("sst2", "freeze_bottom3", 1, 0.770, 70.0),
        # fast enough, but 1.5 points below: missed for accuracy only
        _run("sst2", "neq_fast", 0, 0.785, 65.0, summary), _run("sst2", "neq_fast", 1, 0.775, 65.0, summary),
        _run("sst2", "lora", 0, 0.70, 50.0), _run("sst2", "neq_lora", 0, 0.70, 55.0, summary),
    ])  # fmt: skip
    step = {"meta": {"threads": 1, "shape": "bert, 6 layers x 384"}, "lengths": {"64": {
        "a_none": {"time_ratio": 1.01, "cpu_time_ratio": 1.0}, "b_random50": {"time_ratio": 0.95, "cpu_time_ratio": 1.0},
        "bottom1": {"time_ratio": 0.8, "cpu_time_ratio": 0.8}, "bottom2": {"time_ratio": 0.7, "cpu_time_ratio": 0.7},
    }}}  # fmt: skip
    with open(tmp_path / "step_time.json", "w") as f:
        json.dump(step, f)
    return tmp_path


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]


def test_verdicts_need_both_time_and_accuracy(results):
    args = targets.parse_args(["--grid_dirs", str(results / "glue"), "--long_dirs", str(results / "none"),
                               "--step_time", str(results / "step_time.json"), "--profile_step_time",
                               str(results / "step_time.json"), "--tasks", "sst2"])  # fmt: skip
    rows = {(r[0], r[2]): r[:1] + r[2:] for r in _rows(targets.render(args)) if r[0] != "target"}
    assert {r[1] for r in _rows(targets.render(args))} >= {"`glue`", "`step_time.json`"}
    default = rows[("default: ≤ 0.85× full, within 0.5 points", "`neq`, SST-2")]
    assert default[2].startswith("0.840× full's CPU time, -0.4 points") and default[3] == "met"
    dominance = rows[("`neq` not dominated by `freeze_bottom` k=2 or 3", "`neq` vs `freeze_bottom`, SST-2")]
    assert dominance[3] == "missed (dominated by k=2)"
    fast = rows[("fastest recommended: ≤ 0.70× full, within 1.0", "`neq_fast`, SST-2")]
    assert fast[3] == "missed (accuracy)"
    lora = rows[("NEq+LoRA default: ≤ 0.90× LoRA, within 0.5", "`neq_lora`, SST-2")]
    assert lora[2].startswith("1.100× lora's CPU time, +0.0 points (seeds 0)") and lora[3] == "missed (time)"
    assert rows[("step time, nothing frozen: ≤ 1.03×", "NEq's step, 1 thread")][3] == "met"
    assert rows[("step time, 50% random rows frozen: ≤ 0.90×", "NEq's step, 1 thread")][3] == "missed"
    # no MRPC runs and no longer run: nothing is claimed for them
    assert not any("MRPC" in key[1] or "500-step" in key[0] for key in rows)


def test_profile_weighs_the_bottom_k_step_costs_by_time_frozen(results):
    args = targets.parse_args(["--grid_dirs", str(results / "glue"), "--long_dirs", str(results / "none"),
                               "--step_time", str(results / "step_time.json"), "--profile_step_time",
                               str(results / "step_time.json"), "--tasks", "sst2"])  # fmt: skip
    profile = [r[1:] for r in _rows(targets.render(args)) if r[0] == "`glue`" and r[1].startswith("`neq`, SST-2")]
    assert len(profile) == 2
    run = profile[0]
    # layer 0 frozen half the run (1 -> 0.8), layer 1 a quarter (0.8 -> 0.7): 1 - 0.2 * 0.5 - 0.1 * 0.25 = 0.875
    assert run[1] == "36 of 126" and run[2] == "0: 50%, 1: 25%" and run[3] == "0.88"
    assert run[4] == "5.0%" and run[5] == f"{0.875 / 0.95:.2f}×" and run[6] == "0.84×"


def test_readme_block_is_replaced(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- targets:start -->\nSTALE BLOCK\n<!-- targets:end -->\nrest\n")
    targets.main(["--grid_dirs", str(results / "glue"), "--long_dirs", str(results / "none"), "--step_time",
                  str(results / "step_time.json"), "--profile_step_time", str(results / "step_time.json"), "--tasks",
                  "sst2", "--output", str(tmp_path / "t.md"), "--readme", str(readme)])  # fmt: skip
    text = readme.read_text()
    assert "STALE BLOCK" not in text and text.startswith("intro\n<!-- targets:start -->\nGenerated by `python")
    assert text.endswith("<!-- targets:end -->\nrest\n") and "| default: ≤ 0.85× full" in text
