"""The frozen-fraction heatmap of an NEq run."""

from __future__ import annotations

import json

import matplotlib
import pytest
from matplotlib.image import imread

from neq_hf.plotting import HEATMAP_NAME, load_checks, plot_frozen_heatmap


def history(layers: int = 3, checks: int = 4) -> list[dict]:
    """Records shaped like ``tracker.history``: a reference check, then checks where lower layers freeze first."""
    out = []
    for t in range(checks + 1):
        heads = [min(1.0, max(0.0, (t - 1 - i) / checks)) for i in range(layers)]
        neurons = [h / 2 for h in heads]
        out.append(
            {
                "step": 10 * t,
                "check": t,
                "frozen_fraction": sum(heads + neurons) / (2 * layers),
                "frozen_fraction/heads": sum(heads) / layers,
                "frozen_fraction/neurons": sum(neurons) / layers,
                "per_layer/heads": heads,
                "per_layer/neurons": neurons,
            }
        )
    return out


def test_heatmap_is_a_png_with_one_panel_per_kind(tmp_path):
    backend = matplotlib.get_backend()
    path = plot_frozen_heatmap(history(), tmp_path / "out" / HEATMAP_NAME)
    assert path == str(tmp_path / "out" / HEATMAP_NAME)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    two = imread(path)
    one = imread(plot_frozen_heatmap(history(), tmp_path / "heads.png", kinds=["heads"]))
    # Two stacked panels make a taller figure than one.
    assert two.shape[0] > one.shape[0] and two.shape[1] == one.shape[1]
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_heatmap_reads_the_history_file_layout(tmp_path):
    record = {"config": {}, "summary": {}, "checks": history()}
    file = tmp_path / "neq_history.json"
    file.write_text(json.dumps(record))
    assert load_checks(file) == load_checks(record) == history()
    plot_frozen_heatmap(file, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_heatmap_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no check after the reference"):
        plot_frozen_heatmap(history()[:1], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\['dense'\].*records \['heads', 'neurons'\]"):
        plot_frozen_heatmap(history(), tmp_path / "x.png", kinds=["dense"])
    with pytest.raises(ValueError, match="'checks'"):
        load_checks({"summary": {}})
