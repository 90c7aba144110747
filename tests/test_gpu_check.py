"""``scripts/gpu-check.sh --dry-run``: the GPU script's CPU-only rehearsal, as CI runs it.

Every step's ``mrl`` command goes through mrl's own parser (a renamed flag fails here, not on the
day a GPU is lent), and the steps that need no server run at toy sizes on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_dry_run_checks_every_step_and_runs_the_cheap_ones(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu-check: done" in done.stdout
    for step in ("latency", "embeddings", "workers"):  # server steps: checked, not run
        assert f"== {step}\n   (dry run: command checked, not run)" in done.stdout
    assert (tmp_path / "scaling" / "scaling.md").is_file()
    assert "torch-bf16" in (tmp_path / "encoders" / "encoders.md").read_text()


def test_steps_says_which_steps_run(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "STEPS": "latency,workers"}
    done = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ran = [line[3:] for line in done.stdout.splitlines() if line.startswith("== ") and "machine" not in line]
    assert ran == ["latency", "workers"]


def test_a_command_mrl_would_refuse_fails_the_dry_run(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "STEPS": "latency", "DIMS": "sixty-four"}
    done = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "--dims" in done.stderr, done.stdout + done.stderr
    assert "gpu-check: done" not in done.stdout


def test_anything_but_dry_run_is_refused():
    done = subprocess.run(["bash", "scripts/gpu-check.sh", "--cpu"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
