"""`--help` of every command-line script renders (argparse %-formats help strings: one bare "%" crashed them all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def scripts() -> list[Path]:
    """Scripts of examples/ and benchmarks/ that parse a command line."""
    found = []
    for folder in ("examples", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "__main__" in text and "ArgumentParser" in text:
                found.append(path)
    return found


def test_every_script_prints_its_help():
    paths = scripts()
    names = {p.relative_to(ROOT).as_posix() for p in paths}
    assert {"examples/glue.py", "benchmarks/glue_compare.py", "benchmarks/smollm2_sst2.py"} <= names
    # All at once: each one mostly waits for its imports.
    running = [
        (path, subprocess.Popen([sys.executable, str(path), "--help"], cwd=ROOT, env=subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for path in paths
    ]  # fmt: skip
    failures, printed = [], {}
    for path, process in running:
        out, err = process.communicate(timeout=300)
        printed[path.relative_to(ROOT).as_posix()] = " ".join(out.split())
        if process.returncode != 0 or "usage:" not in out:
            failures.append(f"{path.relative_to(ROOT)} (exit {process.returncode}):\n{err[-1500:]}")
    assert not failures, "\n\n".join(failures)
    glue = printed["examples/glue.py"]
    assert "--check_every" in glue and "checks per run" in glue
    assert "--freeze_bottom_layers" in glue and "--no_save_model or --save_model false skips it" in glue
