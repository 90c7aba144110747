"""The ``mrl`` command: known failures end with exit code 2 and one readable line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mrl.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrl", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "eval" in result.stdout


def test_bad_data_is_one_line_without_traceback(tmp_path: Path):
    result = run_cli("train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mrl: error: {tmp_path / 'missing'}: not found (expected a BEIR folder or a pairs .jsonl file)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "mrl: error: --epochs must be positive, got 0.0"),
        (["--eval-split", "train"], "training and evaluation split are both 'train'"),
    ],
)
def test_invalid_options(tiny_beir: Path, tmp_path: Path, capsys, args, message):
    assert main(["train", "--data", str(tiny_beir), "--output", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_any_work(tiny_beir: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(["train", "--data", str(tiny_beir), "--output", str(out)]) == 2
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "old"


def test_unparsable_dims_is_a_usage_error(tiny_beir: Path, tmp_path: Path):
    result = run_cli("eval", "--data", str(tiny_beir), "--dims", "64,abc")
    assert result.returncode == 2
    assert "comma-separated integers" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_command_compares_models_and_writes_reports(tiny_beir: Path, tmp_path: Path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--data",
            str(tiny_beir),
            "--model",
            "sentence-transformers/all-MiniLM-L6-v2",
            "--dims",
            "384,64",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| dim | all-MiniLM-L6-v2 NDCG@10 | % of full |"
    assert "| 384 | 1.000 | 100.0% |" in printed  # four unambiguous documents: the real model ranks them right
    assert {p.name for p in out.iterdir()} == {"eval.json", "eval.md", "eval_ndcg.png"}
