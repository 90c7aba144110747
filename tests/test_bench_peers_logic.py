"""``mrl bench peers`` without servers: settings checks, peer choice, answer parsing, ratios, the tables, the plot,
and infinity's set-up (its venv, the model folder its old sentence-transformers reads, the vector check)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks import peers
from benchmarks.latency import CellResult, LatencyConfig, Outcome
from benchmarks.loadgen import LoadClient
from benchmarks.peer_servers import infinity
from benchmarks.peers import (
    APIS,
    INFINITY_ONNX,
    INFINITY_TORCH,
    OURS,
    OURS_ONNX,
    SENTENCE_TRANSFORMERS,
    TXTAI,
    PeersConfig,
    check_config,
)
from core.errors import ConfigError
from core.matryoshka import DimensionError
from core.servers import ServerError

MANIFEST = SimpleNamespace(dims=[384, 128, 64], model=SimpleNamespace(full_dim=384))


def config(**overrides) -> PeersConfig:
    return PeersConfig(**{"index": "index", "data": "data", **overrides})


@pytest.fixture
def txtai_installed(monkeypatch):
    monkeypatch.setattr(peers, "txtai_missing", lambda: None)


def test_default_plan_is_full_and_64_with_every_peer(txtai_installed):
    plan = check_config(config(), MANIFEST)
    expected_peers = [TXTAI, SENTENCE_TRANSFORMERS, INFINITY_TORCH, INFINITY_ONNX]
    assert (plan.dims, plan.peers, plan.skipped) == ([384, 64], expected_peers, {})
    assert check_config(config(dims=[128]), MANIFEST).dims == [384, 128]  # the full dim is always measured
    no_64 = SimpleNamespace(dims=[384, 128], model=SimpleNamespace(full_dim=384))
    assert check_config(config(), no_64).dims == [384]


def test_txtai_is_skipped_by_default_but_required_when_named(monkeypatch):
    monkeypatch.setattr(peers, "txtai_missing", lambda: "txtai is not installed (pip install ...)")
    plan = check_config(config(), MANIFEST)
    assert plan.peers == [SENTENCE_TRANSFORMERS, INFINITY_TORCH, INFINITY_ONNX]
    assert plan.skipped == {TXTAI: "txtai is not installed (pip install ...)"}
    assert check_config(config(peers=[SENTENCE_TRANSFORMERS]), MANIFEST).skipped == {}
    with pytest.raises(ValueError, match="--peers asks for txtai, but txtai is not installed"):
        check_config(config(peers=[TXTAI]), MANIFEST)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"dims": [100]}, DimensionError, r"dims \[100\] are not in the index"),
        ({"peers": ["elasticsearch"]}, ValueError, r"unknown peers \['elasticsearch'\]"),
        ({"concurrency": [0]}, ValueError, "--concurrency must list positive numbers"),
        ({"requests": 0}, ValueError, "--requests must be positive"),
        ({"k": 101}, ValueError, "--k must be at most 100"),
        ({"warmup": -1}, ValueError, "--warmup must be 0 or more"),
        ({"max_queries": 0}, ValueError, "--max-queries must be positive"),
        ({"build_timeout_s": 0}, ValueError, "--build-timeout must be positive"),
        ({"device": "tpu"}, ValueError, "--device must be auto, cpu or gpu"),
        ({"workers": 0}, ValueError, "--workers must be positive"),
        ({"rounds": 0}, ValueError, "--rounds must be positive"),
    ],
)
def test_bad_settings_are_one_line_errors(txtai_installed, overrides, error, message):
    with pytest.raises(error, match=message):
        check_config(config(**overrides), MANIFEST)


def test_workers_start_ours_as_that_many_processes():
    settings = LatencyConfig(index=Path("idx"), queries=Path("q"), device="cpu")
    command = peers.our_command(config(workers=2), settings, "onnx", 8000)
    assert command[command.index("--workers") + 1] == "2" and command[command.index("--encoder") + 1] == "onnx"
    assert "--workers" not in peers.our_command(config(), settings, "torch", 8000)


def test_each_server_answer_shape_gives_ids_best_first():
    ours = {"results": [{"query": "q", "hits": [{"id": "d2", "score": 0.9}, {"id": "d1", "score": 0.5}]}]}
    assert APIS[OURS].hit_ids(ours) == ["d2", "d1"]
    assert APIS[SENTENCE_TRANSFORMERS].hit_ids({"hits": [{"id": "d2", "score": 0.9, "text": "t"}]}) == ["d2"]
    assert APIS[TXTAI].hit_ids([{"id": "d2", "text": "t", "score": 0.9}, ["d1", 0.5]]) == ["d2", "d1"]
    assert APIS[OURS].params("fever", 10, 64) == {"q": "fever", "k": 10, "dim": 64}
    assert APIS[TXTAI].params("fever", 100, 64) == {"query": "fever", "limit": 100}  # no dims: full only
    with pytest.raises(TypeError):
        APIS[SENTENCE_TRANSFORMERS].hit_ids({"hits": "none"})


def test_one_request_function_for_all_servers():
    async def answer(request: web.Request) -> web.Response:
        q = request.query["q"]
        if q == "fails":
            return web.json_response({"error": "overloaded"}, status=503)
        body = {"hits": [{"id": "d1"}]} if q == "plain" else {"results": [{"hits": []}], "timings_ms": {"encode_ms": 2}}
        return web.json_response(body if q != "empty" else {"detail": "nothing"})

    async def outcomes(api, queries: list[str]) -> list[Outcome]:
        app = web.Application()
        app.router.add_get(api.path, answer)
        async with TestServer(app, host="127.0.0.1") as server, LoadClient(str(server.make_url(""))) as client:
            return [await peers.request_sender(api)(client, api.params(q, 10)) for q in queries]

    plain, fails, empty = asyncio.run(outcomes(APIS[SENTENCE_TRANSFORMERS], ["plain", "fails", "empty"]))
    assert plain.error is None and plain.timings is None and plain.seconds >= 0
    assert fails.error.startswith("HTTP 503") and empty.error.startswith("HTTP 200 without hits")
    (ours,) = asyncio.run(outcomes(APIS[OURS], ["timed"]))
    assert ours.error is None and ours.timings == {"encode_ms": 2}


def cell(system: str, dim: int, concurrency: int, p50: float | None, rps: float) -> CellResult:
    return CellResult(system, dim, None, concurrency, 10, 10, 0, p50, p50, p50, p50, rps, 1.0, {}, None)


def test_ratios_compare_with_ours_at_full_dim_and_same_concurrency():
    results = [cell(OURS, 384, 1, 20.0, 50.0), cell(OURS, 384, 16, 100.0, 160.0), cell(OURS, 64, 1, 10.0, 100.0)]
    results += [cell(TXTAI, 384, 1, 40.0, 25.0), cell(TXTAI, 384, 16, None, 0.0)]
    systems = {
        OURS: {"build_s": 12.0, "quality": {"384": {"ndcg@10": 0.9, "recall@100": 1.0}, "64": {"ndcg@10": 0.8}}},
        TXTAI: {"build_s": 8.0, "quality": {"384": {"ndcg@10": 0.9, "recall@100": 1.0}}},
    }
    rows = peers.result_rows(results, systems, full_dim=384)
    assert [(r["system"], r["dim"], r["p50_ratio"], r["rps_ratio"]) for r in rows] == [
        (OURS, 384, 1.0, 1.0),
        (OURS, 384, 1.0, 1.0),
        (OURS, 64, 0.5, 2.0),
        (TXTAI, 384, 2.0, 0.5),
        (TXTAI, 384, None, 0.0),
    ]
    assert rows[2]["ndcg@10"] == 0.8 and rows[2]["recall@100"] is None and rows[3]["build_s"] == 8.0


def test_markdown_has_one_row_per_cell_and_says_why_a_peer_was_skipped():
    results = [cell(OURS, 384, 1, 20.0, 50.0), cell(SENTENCE_TRANSFORMERS, 384, 1, 30.0, 40.0)]
    quality = {"384": {"ndcg@10": 0.92, "recall@100": 1.0, "errors": 0, "not_asked": 0}}
    measured = {"status": "measured", "served_by": "x", "build_s": 3.0, "build_note": "n", "quality": quality}
    systems = {OURS: measured, SENTENCE_TRANSFORMERS: measured, TXTAI: {"status": "skipped", "reason": "not here"}}
    report = {
        "settings": {"quality_k": 100, "k": 10, "requests": 10, "warmup": 2},
        "machine": {"cpus_usable": 2, "load_average_1m": 1.0, "gpu": None},
        "index": {"model": "m", "num_vectors": 120, "path": "p"},
        "dataset": {"num_queries": 120, "name": "sample", "split": "test"},
        "systems": systems,
        "results": peers.result_rows(results, systems, full_dim=384),
    }
    text = peers.peers_markdown(report)
    assert "| ours | 384 | 1 | 20.0 | 20.0 | 20.0 | 50.0 | 0 | 1.00× | 1.00× | 0.920 | 1.000 | 3.0 |" in text
    assert "| sentence-transformers | 384 | 1 | 30.0 | 30.0 | 30.0 | 40.0 | 0 | 1.50× | 0.80× |" in text
    assert "- **txtai**: skipped: not here" in text


# --- infinity: choosing it, its venv ----------------------------------------------------------


def test_infinity_is_skipped_by_default_when_its_venv_cannot_be_made(monkeypatch, tmp_path):
    def fail(root, log_path, timeout_s=0):
        raise ConfigError("cannot set up infinity-emb 0.0.78: `pip install -r x` failed (exit code 1: ERROR: no net)")

    monkeypatch.setattr(infinity, "ensure_venv", fail)
    plan = peers.Plan([384], [SENTENCE_TRANSFORMERS, INFINITY_TORCH, INFINITY_ONNX], {})
    skipped, python = peers.with_infinity(plan, config(), tmp_path)
    assert python is None and skipped.peers == [SENTENCE_TRANSFORMERS]
    assert set(skipped.skipped) == {INFINITY_TORCH, INFINITY_ONNX} and "ERROR: no net" in skipped.skipped[INFINITY_ONNX]
    with pytest.raises(ConfigError, match="cannot set up infinity-emb"):  # named: it must run
        peers.with_infinity(plan, config(peers=[INFINITY_ONNX]), tmp_path)
    assert peers.with_infinity(peers.Plan([384], [TXTAI], {}), config(), tmp_path)[1] is None  # not asked: no venv


def test_infinity_venv_is_reused_when_built_from_todays_pins(monkeypatch, tmp_path):
    folder = infinity.venv_folder(tmp_path)
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").touch()
    (folder / infinity.MARKER).write_text("torch==0.1\n")
    assert folder.name == "infinity-0.0.78" and not infinity.venv_ready(folder)  # other pins: rebuilt
    (folder / infinity.MARKER).write_text(infinity.REQUIREMENTS.read_text())
    assert infinity.venv_ready(folder)
    monkeypatch.setattr(infinity, "_run_step", lambda *args: pytest.fail("a ready venv is not rebuilt"))
    assert infinity.ensure_venv(tmp_path, tmp_path / "install.log") == folder / "bin" / "python"


def test_a_failed_venv_creation_leaves_nothing_to_reuse(monkeypatch, tmp_path):
    steps = []

    def step(what, command, log, log_path, timeout_s):
        steps.append(what)
        if what.startswith("pip install -r"):
            raise ConfigError(f"cannot set up infinity-emb: `{what}` failed")

    monkeypatch.setattr(infinity, "_run_step", step)
    with pytest.raises(ConfigError, match="pip install -r infinity-requirements.txt"):
        infinity.ensure_venv(tmp_path / "venvs", tmp_path / "install.log")
    assert steps == ["python -m venv", "pip install torch==2.13.0", "pip install -r infinity-requirements.txt"]
    assert list((tmp_path / "venvs").iterdir()) == []  # neither the venv nor its partial folder


def test_a_finished_venv_is_renamed_into_place(monkeypatch, tmp_path):
    def step(what, command, log, log_path, timeout_s):
        if what == "python -m venv":
            (Path(command[-1]) / "bin").mkdir(parents=True)
            (Path(command[-1]) / "bin" / "python").touch()

    monkeypatch.setattr(infinity, "_run_step", step)
    folder = infinity.venv_folder(tmp_path)
    python = infinity.ensure_venv(tmp_path, tmp_path / "install.log")
    assert python == folder / "bin" / "python" and infinity.venv_ready(folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["infinity-0.0.78", "install.log"]
    (folder / infinity.MARKER).write_text("torch==0.1\n")  # the pins changed: built anew, then replaced
    (folder / "old-file").touch()
    assert infinity.ensure_venv(tmp_path, tmp_path / "install.log") == python and infinity.venv_ready(folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["infinity-0.0.78", "install.log"]
    assert not (folder / "old-file").exists()


def test_a_missing_pins_file_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(infinity, "REQUIREMENTS", tmp_path / "gone.txt")
    with pytest.raises(ConfigError, match="infinity's pins file .*gone.txt cannot be read"):
        infinity.ensure_venv(tmp_path / "venvs", tmp_path / "install.log")
    assert not (tmp_path / "venvs").exists()


def test_an_install_step_that_fails_is_one_line_naming_the_log(tmp_path):
    failing = [sys.executable, "-c", "print('Collecting x'); print('ERROR: No matching distribution'); exit(1)"]
    log_path = tmp_path / "install.log"
    with log_path.open("w") as log, pytest.raises(ConfigError) as caught:
        infinity._run_step("pip install x", failing, log, log_path, 60)
    message = str(caught.value)
    assert "`pip install x` failed (exit code 1: ERROR: No matching distribution)" in message and "\n" not in message
    assert message.endswith(f"log: {log_path}") and "Collecting x" in log_path.read_text()


def test_torch_is_pinned_to_the_local_cpu_wheel_and_installed_first():
    assert infinity.torch_requirement(infinity.REQUIREMENTS.read_text()) == "torch==2.13.0"
    assert "infinity-emb[server,torch,optimum]==0.0.78" in infinity.REQUIREMENTS.read_text()
    with pytest.raises(ConfigError, match="pins no torch version"):
        infinity.torch_requirement("torch\ninfinity-emb==0.0.78  # torch==2.13.0 in a comment\n")


# --- infinity: the model folder ------------------------------------------------------------


def sentence_transformers_6_folder(root: Path, modules: list[str] | None = None) -> Path:
    """A folder as sentence-transformers 6 saves it (fake weights): new class paths, new pooling keys."""
    root.mkdir()
    types = modules or [
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    paths = ["", "1_Pooling", "2_Normalize"]
    entries = [{"idx": i, "name": str(i), "path": paths[i], "type": t} for i, t in enumerate(types)]
    (root / "modules.json").write_text(json.dumps(entries))
    (root / "1_Pooling").mkdir()
    pooling = {"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": True}
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (root / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "feature-extraction"}))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (root / name).write_text("{}")
    (root / "model.safetensors").write_bytes(b"weights")
    (root / "README.md").write_text("not copied")
    return root


def test_a_sentence_transformers_6_folder_is_copied_in_the_old_layout(tmp_path):
    source = sentence_transformers_6_folder(tmp_path / "model")
    before = {path: path.read_bytes() for path in source.rglob("*") if path.is_file()}
    prepared = infinity.prepare_model_folder(source, tmp_path / "copy", max_seq_length=256)
    target = prepared.path
    modules = json.loads((target / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Normalize",
    ]
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    pooling = json.loads((target / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 384 and pooling["pooling_mode_mean_tokens"] is True
    assert pooling["pooling_mode_cls_token"] is False and pooling["include_prompt"] is True
    assert json.loads((target / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 256,
        "do_lower_case": False,
    }
    assert json.loads((target / "config_sentence_transformers.json").read_text())["prompts"] == {}  # sent prompted
    assert (target / "model.safetensors").read_bytes() == b"weights" and (target / "tokenizer.json").is_file()
    assert not (target / "README.md").exists()
    assert prepared.pooling == "mean" and "1_Pooling/config.json" in prepared.rewritten
    assert {path: path.read_bytes() for path in source.rglob("*") if path.is_file()} == before  # only read


def test_an_old_layout_folder_keeps_its_pooling_flags(tmp_path):
    old = {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    assert infinity.legacy_pooling(old) == old and infinity.pooling_mode(old) == "cls"
    assert infinity.pooling_mode(infinity.legacy_pooling({"pooling_mode": ["mean", "max"]})) == "max+mean"
    with pytest.raises(ConfigError, match="unknown pooling mode"):
        infinity.legacy_pooling({"pooling_mode": "median"})
    assert infinity.legacy_modules([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]) == [
        {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: (root / "model.safetensors").unlink(), "needs model.safetensors"),
        (lambda root: (root / "modules.json").unlink(), "needs modules.json"),
        (
            lambda root: (root / "modules.json").write_text(json.dumps([{"type": "x.Dense", "path": "2_Dense"}])),
            "not 'Dense'",
        ),
    ],
)
def test_a_folder_infinity_cannot_be_given_is_a_config_error(tmp_path, change, message):
    source = sentence_transformers_6_folder(tmp_path / "model")
    change(source)
    with pytest.raises(ConfigError, match=message):
        infinity.prepare_model_folder(source, tmp_path / "copy", max_seq_length=None)
    assert not (tmp_path / "copy").exists()


# --- infinity: its server --------------------------------------------------------------------


def test_infinity_runs_in_the_model_folder_with_a_model_id_of_dot_and_mean_pooling(tmp_path):
    command = infinity.server_command(Path("/venv/bin/python"), tmp_path, "optimum", "mean", 8123, "gpu")
    assert command[:2] == ["/venv/bin/python", "-c"] and command[3:5] == [str(tmp_path), "v2"]
    flags = dict(zip(command[5::2], command[6::2], strict=True))
    assert flags == {
        "--model-id": ".",
        "--engine": "optimum",
        "--pooling-method": "mean",
        "--device": "cuda",
        "--host": "127.0.0.1",
        "--port": "8123",
        "--log-level": "warning",
    }
    env = infinity.server_environment({"PATH": "/bin"}, tmp_path)
    assert env["HF_HUB_OFFLINE"] == "1" and env["DO_NOT_TRACK"] == "1" and env["INFINITY_HOME"] == str(tmp_path)


def test_a_failed_onnx_optimisation_is_read_from_infinity_log():
    log = """INFO     2026-12-02 04:33:16,860 infinity_emb INFO:         utils_optimum.py:168
         Optimizing model
WARNING  2026-12-02 04:33:16,862 infinity_emb WARNING:      utils_optimum.py:199
         Optimization failed with
         OptimizationConfig.__init__() got an unexpected
         keyword argument 'optimize_with_onnxruntime_only'.
         Going to use the unoptimized model.
"""
    reason = infinity.optimisation_failure(log)
    assert reason == "OptimizationConfig.__init__() got an unexpected keyword argument 'optimize_with_onnxruntime_only'"
    wide = (  # with COLUMNS=200, as the benchmark starts it
        "WARNING  2026-12-02 04:47:00,545 infinity_emb WARNING: Optimization failed with OptimizationConfig.__init__() "
        "got an unexpected keyword argument 'optimize_with_onnxruntime_only'.  utils_optimum.py:199\n"
        "         Going to use the unoptimized model.      \n"
    )
    assert infinity.optimisation_failure(wide) == reason
    assert infinity.optimisation_failure("INFO ready") is None


# --- vectors and embeddings requests -------------------------------------------------------------


def test_infinity_gets_the_prompt_from_the_client_ours_from_input_type():
    assert peers.embedding_body(INFINITY_ONNX, "fever", "query: ") == {"input": "query: fever"}
    assert peers.embedding_body(INFINITY_TORCH, ["a", "b"], "q: ", dimensions=64) == {
        "input": ["q: a", "q: b"],
        "dimensions": 64,
    }
    assert peers.embedding_body(OURS, "fever", "query: ") == {"input": "fever", "input_type": "query"}
    assert peers.embedding_body(OURS_ONNX, ["a"], "d: ", kind="document") == {"input": ["a"], "input_type": "document"}


def test_embedding_answers_are_read_in_input_order():
    body = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}]}
    assert peers.embedding_matrix(body, 2).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ServerError, match="expected 3 vectors"):
        peers.embedding_matrix(body, 3)
    with pytest.raises(ServerError, match="not an embeddings answer"):
        peers.embedding_matrix({"detail": "overloaded"}, 1)


def unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_the_vector_check_needs_every_query_at_0999():
    ours = unit_rows(20, 384)
    same = peers.vector_check(ours, ours * 1.0000001)
    assert same["passed"] and same["min_cosine"] == pytest.approx(1.0) and same["queries"] == 20
    other = ours.copy()
    other[7] = unit_rows(1, 384, seed=1)[0]  # one query's vector is another's: CLS pooling, a wrong prompt...
    failed = peers.vector_check(ours, other)
    assert not failed["passed"] and failed["min_cosine"] < 0.5 and failed["mean_cosine"] > 0.9
    message = peers.check_failure(failed)
    assert message.startswith("its vectors differ from ours: min cosine") and "over 20 queries" in message
    assert "at least 0.999 needed" in message
    sliced = peers.vector_check(ours, ours[:, :64])
    assert sliced["passed"] is False and sliced["min_cosine"] is None and "shape" in peers.check_failure(sliced)


def test_norms_at_a_small_dim_are_measured_not_assumed():
    full = unit_rows(20, 384)
    sliced = peers.norm_summary(full[:, :64], 64)  # what infinity returns for dimensions=64
    assert sliced["dim"] == 64 and sliced["max"] < 1.0
    renormalised = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)  # what ours returns
    assert peers.norm_summary(renormalised, 64) == {"dim": 64, "min": 1.0, "mean": 1.0, "max": 1.0}


def test_the_probe_takes_twenty_queries_the_smallest_dim_and_the_longest_passage_cut():
    documents = [SimpleNamespace(passage="short"), SimpleNamespace(passage="x" * 5000)]
    manifest = SimpleNamespace(
        dims=[384, 64], model=SimpleNamespace(full_dim=384, query_prompt="q: ", document_prompt="")
    )
    probe = peers.vector_probe([f"query {n}" for n in range(30)], documents, manifest, [384, 64])
    assert len(probe.queries) == 20 and probe.small_dim == 64 and probe.small_dim_indexed
    assert probe.long_text == "x" * 2000 and probe.query_prompt == "q: "
    full_only = peers.vector_probe(["q"], documents, manifest, [384])
    assert full_only.small_dim == 64 and full_only.small_dim_indexed  # 64 is indexed, though not measured
    no_64 = SimpleNamespace(dims=[384], model=manifest.model)
    assert not peers.vector_probe(["q"], documents, no_64, [384]).small_dim_indexed  # infinity only


def test_vector_facts_compare_with_ours_when_there_is_a_reference():
    probe = SimpleNamespace(long_text="x" * 2000, small_dim=64)
    ours = {"queries": unit_rows(20, 384), "long": unit_rows(1, 384, seed=3)}
    theirs = {**ours, "small": ours["queries"][:, :64]}
    facts = peers.vector_facts(theirs, ours, probe)
    assert facts["check"]["passed"] and facts["long_input"] == {"chars": 2000, "cosine": pytest.approx(1.0)}
    assert facts["norm_at_dim"]["dim"] == 64 and facts["norm_at_dim"]["max"] < 1
    assert set(peers.vector_facts(ours, None, probe)) == set()  # ours itself, at no small dim


# --- the embeddings table and the plot -------------------------------------------------------------


def test_embeddings_rows_compare_with_the_faster_infinity_engine_at_the_same_concurrency():
    results = [cell(OURS, 384, 1, 5.0, 200.0), cell(OURS, 384, 16, 40.0, 400.0)]
    results += [cell(INFINITY_TORCH, 384, 1, 10.0, 100.0), cell(INFINITY_TORCH, 384, 16, 80.0, 200.0)]
    results += [cell(INFINITY_ONNX, 384, 1, 8.0, 125.0), cell(INFINITY_ONNX, 384, 16, 200.0, 80.0)]
    rows = peers.embedding_rows(results)
    assert [(r["system"], r["concurrency"], r["best_infinity"], r["rps_vs_best_infinity"]) for r in rows] == [
        (OURS, 1, INFINITY_ONNX, 1.6),
        (OURS, 16, INFINITY_TORCH, 2.0),
        (INFINITY_TORCH, 1, INFINITY_ONNX, 0.8),
        (INFINITY_TORCH, 16, INFINITY_TORCH, 1.0),
        (INFINITY_ONNX, 1, INFINITY_ONNX, 1.0),
        (INFINITY_ONNX, 16, INFINITY_TORCH, 0.4),
    ]
    assert "server_ms" not in rows[0] and rows[0]["p99_ms"] == 5.0
    assert peers.embedding_rows([cell(OURS, 384, 1, 5.0, 200.0)])[0]["rps_vs_best_infinity"] is None  # no infinity


def embeddings_report() -> dict:
    quality = {"384": {"ndcg@10": 0.64, "recall@100": 0.9, "errors": 0, "not_asked": 0}}
    ours = {"status": "measured", "served_by": "`mrl serve`", "build_s": 3.0, "build_note": "n", "quality": quality}
    ours["norm_at_dim"] = {"dim": 64, "min": 1.0, "mean": 1.0, "max": 1.0}
    torch_engine = {
        "status": "measured",
        "served_by": "infinity-emb 0.0.78, engine `torch`, from its own venv",
        "command": "infinity_emb v2 --model-id . --engine torch",
        "check": {"queries": 20, "threshold": 0.999, "min_cosine": 0.999998, "mean_cosine": 0.999999, "passed": True},
        "long_input": {"chars": 2000, "cosine": 0.9999},
        "norm_at_dim": {"dim": 64, "min": 0.41, "mean": 0.45, "max": 0.5},
    }
    failed_check = {"queries": 20, "threshold": 0.999, "min_cosine": 0.61, "mean_cosine": 0.7, "passed": False}
    onnx_engine = {"status": "failed", "reason": peers.check_failure(failed_check), "check": failed_check}
    results = [cell(OURS, 384, 1, 20.0, 50.0), cell(OURS, 384, 16, 90.0, 170.0), cell(OURS, 64, 1, 19.0, 52.0)]
    embeddings = [cell(OURS, 384, 1, 6.0, 160.0), cell(INFINITY_TORCH, 384, 1, 12.0, 80.0)]
    systems = {OURS: ours, INFINITY_TORCH: torch_engine, INFINITY_ONNX: onnx_engine}
    return {
        "settings": {"quality_k": 100, "k": 10, "requests": 10, "warmup": 2},
        "machine": {"cpus_usable": 2, "load_average_1m": 1.0, "gpu": None},
        "index": {"model": "m", "num_vectors": 120, "path": "p", "full_dim": 384},
        "dataset": {"num_queries": 120, "name": "sample", "split": "test"},
        "systems": systems,
        "results": peers.result_rows(results, systems, full_dim=384),
        "embeddings": peers.embedding_rows(embeddings),
    }


def test_markdown_has_an_embeddings_table_and_the_measured_vector_facts():
    text = peers.peers_markdown(embeddings_report())
    assert "## Embeddings endpoints" in text
    assert "| ours | 1 | 160.0 | 6.000 | 6.000 | 0 | 2.00× |" in text
    assert "| infinity-torch | 1 | 80.0 | 12.0 | 12.0 | 0 | 1.00× |" in text
    torch_line = next(line for line in text.splitlines() if line.startswith("- **infinity-torch**"))
    assert "min cosine 0.999998 over 20 queries (at least 0.999 needed)" in torch_line
    assert "vector norm at `dimensions=64`: 0.4100–0.5000 (mean 0.4500)" in torch_line
    assert "`infinity_emb v2 --model-id . --engine torch` run in a copy of the model folder" in torch_line
    assert "index build" not in torch_line
    onnx_line = next(line for line in text.splitlines() if line.startswith("- **infinity-onnx**"))
    assert onnx_line.startswith("- **infinity-onnx**: failed: its vectors differ from ours: min cosine 0.6100")
    ours_line = next(line for line in text.splitlines() if line.startswith("- **ours**"))
    assert "index build 3.00 s" in ours_line and "norm at `dimensions=64`: 1.0000–1.0000" in ours_line


def test_each_cell_reports_its_median_round_whole():
    rounds = [
        [cell(OURS, 384, 1, 5.0, 200.0), cell(INFINITY_ONNX, 384, 1, 9.0, 100.0)],
        [cell(OURS, 384, 1, 7.0, 150.0), cell(INFINITY_ONNX, 384, 1, 8.0, 130.0)],
        [cell(OURS, 384, 1, 4.0, 250.0)],  # infinity failed in this round: its median is over two
    ]
    chosen = peers.median_round(rounds)
    assert [(c.encoder, c.throughput_rps, c.p50_ms) for c in chosen] == [
        (OURS, 200.0, 5.0),
        (INFINITY_ONNX, 100.0, 9.0),
    ]
    assert peers.median_round([rounds[0]]) == rounds[0]


def test_the_rounds_section_has_every_rounds_rate_and_ratio_and_the_lowest_lead():
    report = embeddings_report()
    first = [cell(OURS, 384, 1, 6.0, 160.0), cell(INFINITY_TORCH, 384, 1, 12.0, 80.0)]
    second = [cell(OURS, 384, 1, 6.0, 150.0), cell(INFINITY_TORCH, 384, 1, 12.0, 100.0)]
    search = [cell(OURS, 384, 1, 20.0, 50.0), cell(OURS, 64, 1, 19.0, 55.0)]
    report["rounds"] = [
        {"round": number, "results": peers.result_rows(search, report["systems"], 384), "embeddings": rows}
        for number, rows in enumerate([peers.embedding_rows(first), peers.embedding_rows(second)], start=1)
    ]
    text = peers.peers_markdown(report)
    assert "Every server was started and timed 2 times, in turn (rounds)" in text and "## Rounds" in text
    assert "| embeddings | ours | 384 | 1 | 160.0 / 150.0 | 2.00× / 1.50× | 1.50× |" in text
    assert "| embeddings | infinity-torch | 384 | 1 | 80.0 / 100.0 | 1.00× / 1.00× | 1.00× |" in text
    assert "| search | ours | 64 | 1 | 55.0 / 55.0 | 1.10× / 1.10× | 1.10× |" in text
    assert "## Rounds" not in peers.peers_markdown(embeddings_report())  # one round: no such section
    report["systems"][INFINITY_TORCH]["failed_rounds"] = [{"round": 2, "reason": "ServerError: did not start"}]
    torch_line = next(line for line in peers.peers_markdown(report).splitlines() if "**infinity-torch**" in line)
    assert torch_line.endswith("; not timed in round 2: ServerError: did not start.")


def test_the_plot_has_one_line_per_system_embeddings_and_search(tmp_path):
    report = embeddings_report()
    lines = peers.plot_lines(report)
    assert lines["embeddings"] == {OURS: [(1, 160.0, 6.0)], INFINITY_TORCH: [(1, 80.0, 12.0)]}
    assert lines["search"] == {OURS: [(1, 50.0, 20.0), (16, 170.0, 90.0)], "ours @ dim 64": [(1, 52.0, 19.0)]}
    assert set(peers.plot_lines({**report, "results": []})) == {"embeddings"}
    path = peers.plot_peers(report, tmp_path / "peers.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))
