"""Pictures of an NEq run: which layers froze, and when."""

from __future__ import annotations

import json
import os
from typing import Optional, Union

HEATMAP_NAME = "neq_frozen_heatmap.png"

History = Union[list[dict], dict, str, os.PathLike]


def load_checks(history: History) -> list[dict]:
    """The per-check records of a run, from ``tracker.history``, the dict of ``neq_history.json`` or its path."""
    if isinstance(history, (str, os.PathLike)):
        with open(history) as f:
            history = json.load(f)
    if isinstance(history, dict):
        if "checks" not in history:
            raise ValueError("An NEq history dict needs a 'checks' list (the layout of neq_history.json).")
        history = history["checks"]
    return list(history)


def plot_frozen_heatmap(
    history: History, path: Union[str, os.PathLike], kinds: Optional[list[str]] = None, title: Optional[str] = None
) -> str:
    """Save a PNG heatmap of the frozen fraction per layer (rows) at every check (columns), one panel per unit kind.

    Args:
        history: ``trainer.neq_callback.tracker.history``, the content of ``neq_history.json`` or its path.
        path: where to write the PNG.
        kinds: unit kinds to draw (default: every kind recorded, e.g. ``heads`` and ``neurons``).
        title: figure title.

    Returns:
        ``path`` as a string.
    """
    # Figure + FigureCanvasAgg instead of pyplot: no global backend switch, no GUI, safe in threads and on servers.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The reference check (check 0) only records outputs: nothing can be frozen there.
    checks = [c for c in load_checks(history) if c.get("check", 1) > 0]
    if not checks:
        raise ValueError("The NEq history has no check after the reference check: there is nothing to plot yet.")
    recorded = [key.split("/", 1)[1] for key in checks[0] if key.startswith("per_layer/")]
    kinds = list(kinds) if kinds is not None else recorded
    unknown = [k for k in kinds if k not in recorded]
    if not kinds or unknown:
        raise ValueError(f"Unit kinds {unknown or kinds} are not in this NEq history, which records {recorded}.")

    steps = [c.get("step", c["check"]) for c in checks]
    fig = Figure(figsize=(max(4.0, 1.6 + 0.28 * len(checks)), 0.6 + 2.6 * len(kinds)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kinds), 1, squeeze=False, sharex=True)[:, 0]
    image = None
    for ax, kind in zip(axes, kinds):
        data = np.array([c[f"per_layer/{kind}"] for c in checks], dtype=float).T  # (layers, checks)
        image = ax.imshow(
            data, aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest"
        )
        ax.set_ylabel(f"{kind}\nlayer")
        ax.set_yticks(range(data.shape[0]))
        stride = max(1, len(checks) // 12)
        ax.set_xticks(range(0, len(checks), stride))
        ax.set_xticklabels([str(s) for s in steps[::stride]])
    axes[-1].set_xlabel("optimizer step of the check")
    fig.colorbar(image, ax=list(axes), label="frozen fraction")
    fig.suptitle(title or "NEq: frozen fraction per layer")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
