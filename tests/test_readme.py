"""The README's quick start runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "glue").is_dir(), reason="needs ../shared/data/glue")
def test_quick_start_runs_as_written(tmp_path):
    code = quick_start_code()
    assert len([line for line in code.splitlines() if line.strip()]) <= 14
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code.replace('"runs/quickstart"', repr(str(tmp_path / "run")))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    fraction = float(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= fraction <= 1.0
