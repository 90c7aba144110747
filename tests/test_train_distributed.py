"""``mrl train`` under ``torchrun``: two gloo processes on CPU against one process, a killed run resumed,
and the launch errors in one line.

The launches train the tiny random model (``tiny_model``): how the processes share a batch, gather
negatives, report and resume does not depend on the model's size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from mrl.cli import main
from tests.conftest import REPO, SAMPLE
from tests.helpers.models import TINY_DIM, TINY_DIMS
from tests.helpers.training import without_dropout
from training.distributed import Launch, check_launch_options, launch_from_env, per_device_batch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TRAIN = ["train", "--data", str(SAMPLE), "--batch-size", "16", "--mini-batch-size", "8", "--eval-split", "none"]
TRAIN += ["--no-progress"]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "mismatched ranks: RANK=2 is not in 0..1 (WORLD_SIZE=2)"),
        ({"RANK": "0"}, "mismatched ranks: RANK=0 and WORLD_SIZE=None must be set together"),
        ({"LOCAL_RANK": "1"}, "mismatched ranks: LOCAL_RANK=1 but no RANK and WORLD_SIZE"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 with"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "launcher variable RANK='x' is not an integer"),
    ],
)
def test_contradictory_launcher_variables_are_refused(environ, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        launch_from_env(environ)


def test_launch_is_read_from_the_launcher_variables():
    assert launch_from_env({}) == Launch()
    launch = launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.is_main) == (3, 4, 1, False)
    assert per_device_batch(64, launch) == 16
    with pytest.raises(ConfigError, match="--batch-size 30 is not divisible by the 4 processes"):
        per_device_batch(30, launch)
    with pytest.raises(ConfigError, match="--gradual-unfreeze"):
        check_launch_options(launch, gradual_unfreeze=True)


def test_batch_not_divisible_by_the_processes_is_one_line_before_any_work(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["train", "--data", str(SAMPLE), "--output", str(tmp_path / "out"), "--batch-size", "15"]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mrl: error: --batch-size 15 is not divisible by the 2 processes of this launch; use a multiple of 2"
    ]
    assert not (tmp_path / "out").exists()


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def losses(folder: Path) -> list[float]:
    return [
        entry["loss"] for entry in json.loads((folder / "training_report.json").read_text())["training_loss"]["stage1"]
    ]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, tiny_model: Path):
    model = without_dropout(tiny_model, tmp_path / "no-dropout")
    common = [*TRAIN, "--model", str(model), "--max-steps", "4"]
    two = subprocess.run(
        [*TORCHRUN, "-m", "mrl", *common, "--output", str(tmp_path / "two")],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count(f"trained {len(TINY_DIMS)} dims") == 1  # rank 0 alone reports
    # One process: this one (no launcher variables here), which has its libraries loaded already.
    assert main([*common, "--output", str(tmp_path / "one")]) == 0

    report = json.loads((tmp_path / "two" / "training_report.json").read_text())
    assert report["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "global_batch": 16,
        "per_device_batch": 8,
        "gather_across_devices": True,
    }
    assert (
        "Processes: 2 (gloo), global batch 16 = 8 per process" in (tmp_path / "two" / "training_report.md").read_text()
    )
    # Same batches, negatives gathered across the two processes: the loss curve is one process's, to float error.
    assert len(losses(tmp_path / "two")) == 4
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-dropout", "one", "two"]  # no staging, no checkpoints
    assert len(list((tmp_path / "two").rglob("training_report.json"))) == 1

    from core.models import load_model, read_model_card

    assert read_model_card(tmp_path / "two").dims == TINY_DIMS
    assert load_model(str(tmp_path / "two")).encode(["gout"]).shape == (1, TINY_DIM)


def complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints whose trainer state (rank 0's last file) is whole and both ranks' RNG files are there."""
    complete = []
    for state in folder.glob("checkpoint-*/trainer_state.json"):
        try:
            json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if all((state.parent / f"rng_state_{rank}.pth").is_file() for rank in (0, 1)):
            complete.append(state.parent)
    return sorted(complete, key=lambda path: int(path.name.split("-")[1]))


def write_checkpoint(folder: Path, ranks: int, cut: str | None = None) -> Path:
    """A checkpoint folder as the trainer leaves it (trainer state, one RNG file per rank), ``cut`` half written."""
    import random

    import numpy as np
    import torch

    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    for name in [f"rng_state_{rank}.pth" for rank in range(ranks)] if ranks > 1 else ["rng_state.pth"]:
        torch.save(state, folder / name)
        if name == cut:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) // 2])
    return folder


def test_resume_skips_a_checkpoint_the_interruption_cut_short(tmp_path: Path, caplog):
    from training.train import last_complete_checkpoint

    folder = tmp_path / "stage1"
    assert last_complete_checkpoint(folder, 2) is None
    whole = write_checkpoint(folder / "checkpoint-3", ranks=2)
    write_checkpoint(folder / "checkpoint-6", ranks=2, cut="rng_state_1.pth")  # rank 1 killed mid-write
    write_checkpoint(folder / "checkpoint-9", ranks=1)  # a one-process run's files: rank 1's is missing
    (folder / "checkpoint-12").mkdir()  # killed before the trainer state was written
    (folder / "checkpoint-x").mkdir()  # not a checkpoint name
    with caplog.at_level("WARNING", logger="training.train"):
        assert last_complete_checkpoint(folder, 2) == str(whole)
    assert [message for message in caplog.messages if message.startswith("skipping")] == [
        "skipping checkpoint-12: trainer_state.json is missing or incomplete (cut short by the interruption)",
        "skipping checkpoint-9: rng_state_0.pth is missing or incomplete (cut short by the interruption)",
        "skipping checkpoint-6: rng_state_1.pth is missing or incomplete (cut short by the interruption)",
    ]
    assert last_complete_checkpoint(folder, 1) == str(folder / "checkpoint-9")


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_from_its_last_checkpoint(tmp_path: Path, tiny_model: Path):
    output = tmp_path / "model"
    command = [*TORCHRUN, "-m", "mrl", *TRAIN, "--model", str(tiny_model), "--output", str(output)]
    command += ["--epochs", "2", "--max-train-pairs", "48"]
    checkpoints = tmp_path / ".model.checkpoints" / "stage1"
    run = subprocess.Popen(
        command,
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 400
        while not complete_checkpoints(checkpoints) and time.monotonic() < deadline:
            assert run.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.05)  # the tiny model finishes the run seconds after this checkpoint: stop it at once
    finally:
        import psutil  # a dependency of accelerate, which the trainer needs

        # The launcher and both ranks (which run in sessions of their own), as a lost machine would lose them:
        # all stopped first, so that none trains on (or the launcher restarts one) while they are killed.
        launcher = psutil.Process(run.pid)
        processes = [*launcher.children(recursive=True), launcher]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
        running_when_stopped = run.poll() is None
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        run.wait()
    assert running_when_stopped, "the run finished before it could be killed"
    assert not output.exists()
    first = complete_checkpoints(checkpoints)
    assert first, "no checkpoint was written before the kill"
    # A later checkpoint the kill cut short, as a kill lands while rank 1 still writes its RNG file after
    # rank 0 has finished the trainer state: resuming from it failed on rank 1 alone.
    step = int(first[-1].name.split("-")[1])
    for later in checkpoints.glob("checkpoint-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    cut = checkpoints / f"checkpoint-{step + 1}"
    shutil.copytree(first[-1], cut)
    rng = cut / "rng_state_1.pth"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])

    resumed = subprocess.run(
        [*command, "--resume"], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600
    )
    failed = [line for line in resumed.stderr.splitlines() if "[rank1]" in line or "Error" in line]
    assert resumed.returncode == 0, "\n".join([*failed[-30:], resumed.stderr[-2000:]])
    assert f"skipping {cut.name}: rng_state_1.pth is missing or incomplete" in resumed.stderr
    assert f"resuming from {first[-1]}" in resumed.stderr
    report = json.loads((output / "training_report.json").read_text())
    assert report["distributed"]["world_size"] == 2
    logged = report["training_loss"]["stage1"]
    assert logged[-1]["step"] == 6  # 2 epochs of 3 steps (48 pairs, 16 a step)


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
    reason="needs two GPUs",
)
def test_two_gpus_train_with_nccl(tmp_path: Path):
    result = subprocess.run(
        [*TORCHRUN, "-m", "mrl", *TRAIN, "--output", str(tmp_path / "gpu"), "--max-steps", "4"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu" / "training_report.json").read_text())
    assert report["distributed"]["backend"] == "nccl" and report["distributed"]["world_size"] == 2
