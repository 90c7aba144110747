"""The ``mrl`` command: known failures end with exit code 2 and one readable line."""

from __future__ import annotations

import contextlib
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
        (["--dim-weights", "1,2"], "--dim-weights has 2 values for 5 loss dims [384, 256, 128, 64, 32]"),
        (["--train-only-dims", "64"], "--train-only-dims [64] must lie between 1 and the smallest served dim (32)"),
        (["--dim-weights", "1,1,1,0,1"], "--dim-weights must all be positive"),
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


@pytest.mark.slow
def test_eval_encodes_through_a_pool_of_the_workers_asked_for(tiny_beir: Path, tmp_path: Path, monkeypatch, capsys):
    # The pool itself runs the real model in tests/test_index_build.py; here only that eval goes through it.
    import core.models

    asked = []

    @contextlib.contextmanager
    def pool(encoder, workers):
        asked.append((encoder.name, workers))
        yield encoder  # this process encodes: the scores are the ones of one process

    monkeypatch.setattr(core.models, "encoder_pool", pool)
    argv = ["eval", "--data", str(tiny_beir), "--dims", "384,64", "--no-progress", "--workers", "3"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert asked == [("all-MiniLM-L6-v2", 3)]
    assert "| 384 | 1.000 | 100.0% |" in capsys.readouterr().out


def project_errors() -> list[BaseException]:
    from core.data import DataError
    from core.errors import ConfigError, OutputExistsError
    from core.matryoshka import DimensionError
    from core.models import ModelError
    from core.servers import ServerError
    from index.manifest import IndexFolderError

    return [
        ConfigError("--x must be positive, got 0"),
        DataError("corpus.jsonl", "invalid JSON", 3),
        DimensionError("dimension 999 is not between 1 and 384"),
        ModelError("cannot load model 'nope'"),
        IndexFolderError("runs/index: index not found"),
        ServerError("server did not become ready"),
        OutputExistsError("runs/out already exists"),
    ]


# Exceptions of the project that are not a user's to act on from the command line: the service's HTTP
# errors (answered by status code and error body) and an encoder worker's fault (a 503, then a restart).
NOT_CLI_ERRORS = {"service.errors.ServiceError", "service.batching.EncoderFault"}


def test_every_error_of_the_project_has_the_one_base_the_cli_catches():
    import importlib
    import inspect

    from core.errors import MrlError
    from tests.helpers.code import project_modules

    stray = []
    for name in project_modules():
        if name.startswith(("benchmarks.peer_servers", "mrl.__main__")):
            continue
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == name):
                continue
            roots = {f"{base.__module__}.{base.__qualname__}" for base in cls.__mro__}
            if not issubclass(cls, MrlError) and not roots & NOT_CLI_ERRORS:
                stray.append(f"{name}.{cls.__qualname__}")
    assert stray == []


@pytest.mark.parametrize("error", project_errors(), ids=lambda e: type(e).__name__)
def test_project_errors_are_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch, error):
    import training.cli

    def fail(args):
        raise error

    monkeypatch.setattr(training.cli, "run_eval", fail)
    assert main(["eval", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"mrl: error: {error}"]


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback(tmp_path: Path, monkeypatch):
    import training.cli

    def buggy(args):
        return int("not a number")  # a ValueError nobody meant as a message

    monkeypatch.setattr(training.cli, "run_eval", buggy)
    with pytest.raises(ValueError, match="invalid literal for int"):
        main(["eval", "--data", str(tmp_path)])


def test_a_bug_prints_a_traceback_and_exits_1(tmp_path: Path):
    script = (
        "import training.cli\n"
        "def buggy(args):\n"
        "    raise ValueError('a bug, not a message')\n"
        "training.cli.run_eval = buggy\n"
        "from mrl.cli import main\n"
        f"raise SystemExit(main(['eval', '--data', {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: a bug, not a message"
    assert "mrl: error:" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--validation-fraction", "2"], "--validation-fraction must be in (0, 1), got 2.0"),
        (["--warmup-ratio", "-0.1"], "--warmup-ratio must be in [0, 1), got -0.1"),
        (["--lora", "--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
        (["--report-to", "mlflow"], "--report-to 'mlflow' is not one of"),
    ],
)
def test_bad_training_options_are_one_line(tiny_beir: Path, tmp_path: Path, capsys, args, message):
    assert main(["train", "--data", str(tiny_beir), "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"mrl: error: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["index", "build", "--data", "{data}", "--index", "{out}", "--memory-budget-mb", "0"],
        ["index", "build", "--data", "{data}", "--index", "{out}", "--batch-size", "-1"],
        ["index", "build", "--data", "{data}", "--index", "{out}", "--max-seq-length", "0"],
        ["index", "add", "--index", "{out}", "--data", "{data}", "--keep-versions", "0"],
        ["eval", "--data", "{data}", "--batch-size", "0"],
        ["eval", "--data", "{data}", "--workers", "0"],
        ["bench", "scaling", "--sizes", "1000,0", "--out", "{out}"],
    ],
    ids=[
        "build-budget",
        "build-batch",
        "build-seq-length",
        "add-keep",
        "eval-batch",
        "eval-workers",
        "bench-scaling-sizes",
    ],  # fmt: skip
)
def test_non_positive_options_are_one_line(tiny_beir: Path, tmp_path: Path, capsys, args):
    out = tmp_path / "out"
    argv = [a.format(data=tiny_beir, out=out) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mrl: error: --") and "must" in err[0]
    assert not out.exists()


def test_every_command_that_writes_a_folder_spells_it_output_with_out_as_alias():
    """One spelling across commands (--output; --out still works): found by walking the real parser."""
    from tests.helpers.code import cli_commands

    writers = {}
    for path, parser in cli_commands():
        spellings = {option: action for action in parser._actions for option in action.option_strings}
        if "--out" in spellings or "--output" in spellings:
            writers[" ".join(path)] = spellings
    assert {"train", "adapt", "eval", "bench latency", "bench quality"} <= set(writers)
    for command, spellings in writers.items():
        if command in ("index build",):  # --output there is the deprecated spelling of --index
            continue
        assert spellings.get("--out") is spellings.get("--output") is not None, command
