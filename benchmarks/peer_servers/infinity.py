"""infinity-emb as a peer of ``mrl bench peers``: its own virtual environment, a model folder it reads, its command.

infinity (PyPI ``infinity-emb``, CLI ``infinity_emb v2``) is a dynamic-batching embedding server with two CPU
engines: ``torch`` (sentence-transformers) and ``optimum`` (ONNX Runtime through optimum). It has no search, so
the benchmark measures its ``POST /embeddings``. Unlike the other peer servers it is not our code, and it cannot
share our virtual environment: it needs sentence-transformers 3 and transformers 4 (we use 6 and 5). It runs from
a venv of its own, created once from ``infinity-requirements.txt`` beside this file and reused while that file is
unchanged (a copy of it inside the venv says which pins built it).

What infinity 0.0.78 needs of a model folder, each found by running it:

- ``modules.json`` naming sentence-transformers 3 classes (``sentence_transformers.models.Pooling``); a folder
  saved by sentence-transformers 5/6 names ``sentence_transformers.base.modules...``, which 3.x cannot import;
- ``1_Pooling/config.json`` with the old ``pooling_mode_*_tokens`` flags, not 6.x's ``pooling_mode: "mean"``;
- ``sentence_bert_config.json`` with ``max_seq_length`` (6.x keeps it elsewhere);
- for the ``optimum`` engine, ``model.onnx`` beside the weights with the output ``last_hidden_state``;
- the folder as the working directory and ``--model-id .``: infinity hands optimum the ONNX file's path as
  found by globbing the model id (``folder/model.onnx``), and optimum 2 compares it with the file names inside
  the folder (``model.onnx``): only a model id without any directory part matches;
- ``--pooling-method mean`` for a mean-pooling model: the ``optimum`` engine's default is the CLS token, which
  silently gives other vectors.

The weights, config and tokenizer files are copied unchanged (transformers 4 reads those transformers 5 wrote);
the source folder is only read. This module imports nothing but the standard library and ``core.errors``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)

VERSION = "0.0.78"
REQUIREMENTS = Path(__file__).with_name("infinity-requirements.txt")
MARKER = "mrl-requirements.txt"  # inside a finished venv: the requirements it was built from
ENGINES = {"infinity-torch": "torch", "infinity-onnx": "optimum"}  # system name -> `--engine`
INSTALL_TIMEOUT_S = 1800.0
ONNX_FILE = "model.onnx"
ONNX_OUTPUT = "last_hidden_state"  # what infinity's optimum engine reads from the graph
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)
LEGACY_MODULES = {  # class name -> the path sentence-transformers 3 imports it from
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
}
POOLING_FLAGS = {  # sentence-transformers 6 pooling mode -> 3.x's flag
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
# Runs infinity's CLI with the model folder as the working directory (see the module docstring).
LAUNCHER = "import os, runpy, sys; os.chdir(sys.argv.pop(1)); runpy.run_module('infinity_emb.cli', run_name='__main__')"
VERSIONED = ("infinity-emb", "sentence-transformers", "transformers", "torch", "optimum", "optimum-onnx", "onnxruntime")
IMPORT_CHECK = "import infinity_emb, optimum.onnxruntime, sentence_transformers; print(infinity_emb.__version__)"
PROGRESS = re.compile(r"^(Collecting|Installing collected packages|Successfully installed|ERROR)")
SOURCE_LOCATION = re.compile(r"\s[\w.]+\.py:\d+(?=\s|$)")
OPTIMISATION_FAILED = re.compile(r"Optimization failed with (.+?)\.? Going to use the unoptimized model")


# --- the virtual environment ----------------------------------------------------------------


def venv_folder(root: Path) -> Path:
    return root / f"infinity-{VERSION}"


def venv_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def requirements_text() -> str:
    """The pins file's text.

    Raises:
        ConfigError: The file is missing (a non-editable install that did not ship it as package data).
    """
    try:
        return REQUIREMENTS.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"infinity's pins file {REQUIREMENTS} cannot be read ({exc.strerror})") from None


def venv_ready(folder: Path) -> bool:
    """True when ``folder`` is a venv that was finished from today's requirements file."""
    try:
        built_from = (folder / MARKER).read_text(encoding="utf-8")
    except OSError:
        return False
    return built_from == requirements_text() and venv_python(folder).exists()


def torch_requirement(requirements: str) -> str:
    """The ``torch==...`` line of a requirements text, installed alone first so that pip takes the local CPU wheel.

    Raises:
        ConfigError: The requirements pin no torch version.
    """
    for line in requirements.splitlines():
        requirement = line.split("#", 1)[0].strip()
        if re.fullmatch(r"torch\s*==\s*\S+", requirement):
            return requirement.replace(" ", "")
    raise ConfigError(f"{REQUIREMENTS} pins no torch version (torch==...)")


def ensure_venv(root: Path, log_path: Path, timeout_s: float = INSTALL_TIMEOUT_S) -> Path:
    """infinity's interpreter: the cached venv under ``root``, created first when it is missing or outdated.

    A new venv is built in a temporary folder beside it and renamed into place when complete, so a killed
    creation is never reused. pip's output goes to ``log_path``; its progress lines are logged.

    Raises:
        ConfigError: A step failed (no network, no matching wheel, ...): one line naming it and the log.
    """
    folder = venv_folder(root)
    if venv_ready(folder):
        logger.info("infinity: reusing its virtual environment %s", folder)
        return venv_python(folder)
    requirements = requirements_text()
    torch = torch_requirement(requirements)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(f".{folder.name}.partial-*"), *root.glob(f".{folder.name}.stale-*")]:  # killed runs
        shutil.rmtree(leftover, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=root))
    python = venv_python(partial)
    logger.info("infinity: creating its virtual environment %s (pins: %s; pip log: %s)", folder, REQUIREMENTS, log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log_path.open("w", encoding="utf-8") as log:
            steps = [
                ("python -m venv", [sys.executable, "-m", "venv", str(partial)]),
                (f"pip install {torch}", [str(python), "-m", "pip", "install", torch]),
                (f"pip install -r {REQUIREMENTS.name}", [str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)]),
                ("import infinity_emb", [str(python), "-c", IMPORT_CHECK]),
            ]
            for what, command in steps:
                logger.info("infinity: %s", what)
                _run_step(what, command, log, log_path, timeout_s)
        (partial / MARKER).write_text(requirements, encoding="utf-8")
        if folder.exists():  # built from other pins: replaced (a rename onto an empty folder)
            stale = folder.rename(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=root))
            shutil.rmtree(stale, ignore_errors=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("infinity: virtual environment ready in %s", folder)
    return venv_python(folder)


def _run_step(what: str, command: list[str], log: Any, log_path: Path, timeout_s: float) -> None:
    """Run one install step: its output into ``log``, pip's progress lines logged; ConfigError if it fails."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as exc:
        raise ConfigError(f"cannot set up infinity-emb {VERSION}: {what}: {exc}") from None
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        process.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    last_error = ""
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            text = line.strip()
            if PROGRESS.match(text):
                level = logging.WARNING if text.startswith("ERROR") else logging.INFO
                logger.log(level, "infinity: %s", text.split(" (from ", 1)[0][:160])
            if text.startswith("ERROR") or (text and not last_error):
                last_error = text
        code = process.wait()
    finally:
        timer.cancel()
        log.flush()
    if code != 0:
        reason = f"killed after {timeout_s:.0f} s" if timed_out.is_set() else f"exit code {code}"
        raise ConfigError(
            f"cannot set up infinity-emb {VERSION}: `{what}` failed ({reason}: {last_error[:200]}); log: {log_path}"
        )


# --- the model folder -----------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedFolder:
    """A copy of the model that infinity's sentence-transformers 3 reads, and how the model pools."""

    path: Path
    pooling: str  # the model's pooling mode: mean, cls, ...
    rewritten: tuple[str, ...]  # files written in the old format (the rest are copies)


def legacy_modules(modules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``modules.json`` entries with the class paths sentence-transformers 3 imports.

    Raises:
        ConfigError: A module other than Transformer, Pooling and Normalize (e.g. Dense), which this does not convert.
    """
    converted = []
    for entry in modules:
        name = str(entry.get("type", "")).rsplit(".", 1)[-1]
        if name not in LEGACY_MODULES:
            raise ConfigError(f"the infinity peer supports Transformer, Pooling and Normalize modules, not {name!r}")
        converted.append({**entry, "type": LEGACY_MODULES[name]})
    return converted


def legacy_pooling(config: dict[str, Any]) -> dict[str, Any]:
    """A pooling config in sentence-transformers 3's keys; one already in them is returned as it is.

    Raises:
        ConfigError: An unknown pooling mode.
    """
    if "pooling_mode" not in config:
        return dict(config)
    modes = config["pooling_mode"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [mode for mode in modes if mode not in POOLING_FLAGS]
    if unknown:
        raise ConfigError(f"unknown pooling mode {unknown} in the model's 1_Pooling/config.json")
    legacy: dict[str, Any] = {"word_embedding_dimension": config.get("embedding_dimension")}
    legacy |= {flag: mode in modes for mode, flag in POOLING_FLAGS.items()}
    legacy["include_prompt"] = config.get("include_prompt", True)
    return legacy


def pooling_mode(legacy: dict[str, Any]) -> str:
    """``mean``, ``cls``, ... from old-style pooling flags; modes joined with ``+`` when several are on."""
    modes = [mode for mode, flag in POOLING_FLAGS.items() if legacy.get(flag)]
    return "+".join(modes) if modes else "none"


def prepare_model_folder(source: Path, target: Path, max_seq_length: int | None) -> PreparedFolder:
    """Copy the model at ``source`` into ``target`` (a new folder) in the layout infinity's libraries read.

    ``max_seq_length`` (the index's token limit; default: the source's) goes into ``sentence_bert_config.json``.
    The prompts are left out (``config_sentence_transformers.json`` with none): the benchmark sends prompted texts.

    Raises:
        ConfigError: No sentence-transformers folder, no ``model.safetensors`` (an adapter folder, pickled weights)
            or a module this does not convert.
    """
    for required in ("modules.json", "config.json", "model.safetensors"):
        if not (source / required).is_file():
            raise ConfigError(f"the infinity peer needs {required} in the model folder {source}")
    modules = legacy_modules(json.loads((source / "modules.json").read_text(encoding="utf-8")))
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    rewritten = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"]
    _write_json(target / "modules.json", modules)
    pooling = "none"
    for module in modules:
        if module["type"] == LEGACY_MODULES["Pooling"]:
            config = legacy_pooling(json.loads((source / module["path"] / "config.json").read_text(encoding="utf-8")))
            _write_json(target / module["path"] / "config.json", config)
            rewritten.append(f"{module['path']}/config.json")
            pooling = pooling_mode(config)
    bert_config = _read_json(source / "sentence_bert_config.json")
    limit = max_seq_length or bert_config.get("max_seq_length")
    legacy_bert = {"max_seq_length": limit} if limit else {}
    legacy_bert["do_lower_case"] = bool(bert_config.get("do_lower_case"))
    _write_json(target / "sentence_bert_config.json", legacy_bert)
    _write_json(target / "config_sentence_transformers.json", {"prompts": {}, "default_prompt_name": None})
    return PreparedFolder(target, pooling, tuple(rewritten))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


# --- the server -----------------------------------------------------------------------------


def server_command(python: Path, folder: Path, engine: str, pooling: str, port: int, device: str) -> list[str]:
    """``infinity_emb v2`` for ``engine`` (torch or optimum) serving ``folder`` on the loopback ``port``.

    ``device`` is ours (auto, cpu, gpu). Everything else is infinity's default (batch size 32, model warm-up,
    float32 on CPU), but for the access log, which would cost CPU as ours does.
    """
    command = [str(python), "-c", LAUNCHER, str(folder), "v2", "--model-id", ".", "--engine", engine]
    command += ["--pooling-method", pooling, "--device", {"gpu": "cuda"}.get(device, device)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return command


def server_environment(env: dict[str, str], home: Path) -> dict[str, str]:
    """``env`` plus what keeps infinity offline and inside ``home`` (its caches and ONNX optimisation output)."""
    return env | {
        "HF_HOME": str(home / "hf"),
        "INFINITY_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",  # infinity's anonymous usage statistics
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "COLUMNS": "200",  # its rich log lines wrap at 80 columns otherwise
    }


def installed_versions(python: Path) -> dict[str, str]:
    """Versions of the packages that make up infinity in its venv (empty if they cannot be read)."""
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    try:
        done = subprocess.run([str(python), "-c", code, *VERSIONED], capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout) if done.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def optimisation_failure(log_text: str) -> str | None:
    """Why infinity's ONNX graph optimisation failed, from its server log (it then serves the unoptimised graph)."""
    text = re.sub(r"\s+", " ", SOURCE_LOCATION.sub(" ", log_text))  # rich puts `file.py:line` beside its lines
    match = OPTIMISATION_FAILED.search(text)
    return match.group(1).strip() if match else None
