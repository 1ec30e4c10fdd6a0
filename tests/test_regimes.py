"""benchmarks/regimes.py: rows, CPU-time pairing by occasion and the check of reruns against the grid, from synthetic
result files (nothing is run)."""

from __future__ import annotations

import os
import sys

from conftest import write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import regimes  # noqa: E402


def _run(method, seed, accuracy, cpu, cap=None, occasion=None, frozen=0.25):
    run = {"task": "sst2", "method": method, "seed": seed, "max_seq_length": 64, "metrics": {"accuracy": accuracy},
           "train_cpu_seconds": cpu}  # fmt: skip
    if occasion:
        run["occasion"] = occasion
    if method.startswith("neq"):
        config = {"criterion": "relative", "min_loss_drop": 0.1}
        if cap is not None:
            config["eps_relative_max"] = cap
        run["neq"] = {"config": config, "summary": {"final_frozen_fraction": 0.5, "average_frozen_fraction": frozen,
                                                     "gate_step": 36}}  # fmt: skip
    return run


def _rows(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


def test_rows_pair_cpu_time_by_occasion_and_name_runs_without_the_cap(tmp_path):
    grid, out = tmp_path / "glue", tmp_path / "regimes"
    write_results(grid, [_run("full", 0, 0.80, 100.0), _run("neq", 0, 0.79, 90.0, cap=None)])
    folder = out / "lr_x2"
    write_results(folder, [_run("full", 0, 0.80, 100.0), _run("full", 1, 0.82, 100.0),
                    _run("neq", 0, 0.80, 45.0, cap=3e-3, occasion="b"), _run("neq", 1, 0.81, 40.0, cap=3e-3, occasion="b")])  # fmt: skip
    # full fine-tuning made beside the capped runs: CPU time only (seed 1 only)
    write_results(folder / "full_beside", [_run("full", 1, 0.82, 50.0, occasion="b")])
    write_results(folder / "no_cap", [_run("neq", 0, 0.78, 90.0, cap=None), _run("neq", 1, 0.80, 85.0, cap=None)])
    args = regimes.parse_args(["--grid_dir", str(grid), "--results_dir", str(out), "--smollm2", str(tmp_path / "x")])
    rows = _rows(regimes.render(args))[1:]  # below the header
    assert rows[0][1] == "full → neq (no velocity cap)"  # the grid's run predates the cap
    capped, no_cap = [r for r in rows if r[0] == "MiniLM SST-2, full, lr ×2"]
    assert capped[1] == "full → neq" and capped[3] == "accuracy 81.0 → 80.5" and capped[4] == "-0.5"
    assert capped[6] == "0.80× (seeds 1)"  # 40 / 50: only seed 1 has a baseline of its occasion
    assert no_cap[1] == "full → neq (no velocity cap)" and no_cap[3] == "accuracy 81.0 → 79.0"
    assert no_cap[6] == "0.88×"  # (90 + 85) / (100 + 100), the occasion of the earlier runs


def test_cap_check_reports_same_and_other_decisions(tmp_path):
    grid = [_run("neq", 0, 0.79, 90.0), _run("neq", 1, 0.78, 90.0)]
    reruns = [_run("neq", 0, 0.79, 60.0, cap=3e-3), _run("neq", 1, 0.785, 60.0, cap=3e-3, frozen=0.2)]
    text = regimes._cap_check("the GLUE grid", grid, reruns)
    assert "eps_relative_max 0.003" in text
    assert "gate step: sst2 neq seed 0." in text
    assert "Other decisions: sst2 neq seed 1 (accuracy 78.0 → 78.5, average frozen 25% → 20%)." in text
    assert text.startswith("\nNEq runs of the GLUE grid again with the cap")
    assert regimes._cap_check("the GLUE grid", grid, []) == ""
