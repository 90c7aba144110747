"""``mrl serve --workers N``: several processes on one port, their metrics added up, one supervisor.

A real ``mrl serve --workers 2`` over the session's sample index (the real model, loaded by each
worker), reached over HTTP; its workers are found through ``mrl_serving_info``'s ``pid`` label.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from core.servers import free_port
from tests.helpers.servers import MRL_SERVE, REPO, ServeProcess, serve_env, serve_process

pytestmark = pytest.mark.slow
QUERY = "sudden painful swollen big toe joint at night"


@pytest.fixture(scope="module")
def workers(sample_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("workers") / "server.log"
    with serve_process(log, index=sample_index, device="cpu", workers=2, shutdown_timeout_s=5) as server:
        # /readyz answers once the first worker serves (connections go only to workers that accept them)
        wait_for(lambda: len(worker_pids(server)) == 2)
        yield server


def metric_samples(server: ServeProcess, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` in one scrape of /metrics: (labels, value)."""
    samples = []
    for line in server.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        labels = {}
        if "{" in head:
            for pair in head[head.index("{") + 1 : -1].split('",'):
                key, _, shown = pair.partition('="')
                labels[key] = shown.rstrip('"')
        samples.append((labels, float(value)))
    return samples


def worker_pids(server: ServeProcess) -> set[int]:
    return {int(labels["pid"]) for labels, value in metric_samples(server, "mrl_serving_info") if value == 1}


def searches_counted(server: ServeProcess) -> float:
    return sum(
        value
        for labels, value in metric_samples(server, "mrl_requests_total")
        if labels.get("endpoint") == "/search" and labels.get("status") == "2xx"
    )


def search(server: ServeProcess, dim: int = 64) -> httpx.Response:
    # a new connection each time: the kernel hands connections, not requests, to the workers
    return httpx.get(f"{server.base}/search", params={"q": QUERY, "dim": dim, "k": 3}, timeout=60)


def wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def test_two_workers_serve_and_each_loaded_the_index(workers: ServeProcess):
    pids = worker_pids(workers)
    assert len(pids) == 2 and workers.process.pid not in pids
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: search(workers).status_code, range(40)))
    assert statuses == [200] * 40
    # each worker froze what it loaded (a full collection of it stalled every request in flight)
    assert workers.output().count("objects loaded at start-up: the garbage collector skips them") >= 2


def test_metrics_add_up_across_the_workers(workers: ServeProcess):
    before = searches_counted(workers)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: search(workers), range(30)))
    # every scrape, whichever worker answers it, counts every worker's searches
    assert [searches_counted(workers) - before for _ in range(6)] == [30.0] * 6


def test_the_index_is_mapped_once_for_all_workers(workers: ServeProcess, sample_index: Path):
    maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in worker_pids(workers)}
    assert all(".faiss" in text for text in maps.values())  # each worker maps the index files, reading no copy


def test_sighup_reloads_every_worker(workers: ServeProcess):
    def unchanged() -> float:
        samples = metric_samples(workers, "mrl_index_reloads_total")
        return sum(value for labels, value in samples if labels.get("outcome") == "unchanged")

    before = unchanged()
    os.kill(workers.process.pid, signal.SIGHUP)
    wait_for(lambda: unchanged() == before + 2, 30)


def test_a_killed_worker_is_replaced_and_the_others_keep_answering(workers: ServeProcess):
    victim, survivor = sorted(worker_pids(workers))
    os.kill(victim, signal.SIGKILL)
    assert search(workers).status_code == 200  # the other worker answers meanwhile
    wait_for(lambda: len(worker_pids(workers)) == 2 and victim not in worker_pids(workers))
    assert survivor in worker_pids(workers)
    assert search(workers).status_code == 200


def test_sigterm_stops_every_worker(workers: ServeProcess):
    # The last test of the module's server: it stops it (the fixture's own stop then finds it stopped).
    wait_for(lambda: len(worker_pids(workers)) == 2)
    pids = worker_pids(workers)
    assert workers.stop() == 0
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], workers.output()


def test_a_missing_index_is_refused_by_the_supervisor_before_any_worker_starts(tmp_path: Path, sample_index: Path):
    """Each worker found it missing and said so, one line each: two lines for one error, some of the time."""
    from service.settings import ServiceSettings
    from service.workers import WorkersError, check_workers

    with pytest.raises(WorkersError, match=r"^cannot serve: .*none: index not found"):
        check_workers(ServiceSettings(index=str(tmp_path / "none"), workers=2))
    check_workers(ServiceSettings(index=str(sample_index), workers=2))  # a real one passes
    check_workers(ServiceSettings(index=str(tmp_path / "none"), workers=1))  # one process says it itself


def test_a_missing_model_folder_is_refused_by_the_supervisor_before_any_worker_starts(tmp_path: Path,
                                                                                      sample_index: Path):  # fmt: skip
    """Each worker failed to load it and said so: two errors, each logged and printed, for one mistake."""
    from service.settings import ServiceSettings
    from service.workers import WorkersError, check_workers

    for model in (str(tmp_path / "none"), "./none", "~/none-model-folder"):
        with pytest.raises(WorkersError, match=r"^cannot serve: cannot load model .*none.*: no such folder$"):
            check_workers(ServiceSettings(index=str(sample_index), model=model, workers=2))
    check_workers(ServiceSettings(index=str(sample_index), model="org/hub-name", workers=2))  # only loading tells
    check_workers(ServiceSettings(index=str(sample_index), model=str(tmp_path / "none"), workers=1))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"index": "/nonexistent/index"}, "cannot serve"),
        ({"model": "/nonexistent/model"}, "cannot load model '/nonexistent/model': no such folder"),
        ({"writable": "true"}, "--writable takes one process"),
    ],
)
def test_what_workers_cannot_do_is_one_line_and_exit_2(sample_index: Path, tmp_path: Path, settings, expected):
    server = ServeProcess(tmp_path / "log", **{"index": sample_index, "device": "cpu", "workers": 2, **settings})
    code = server.process.wait(timeout=180)
    errors = [line for line in server.output().splitlines() if line.startswith("mrl: error:")]
    assert code == 2, server.output()
    assert len(errors) == 1 and expected in errors[0], server.output()
    assert "Traceback" not in server.output()


def test_a_taken_port_is_one_line_before_any_worker_starts(sample_index: Path):
    port = free_port()
    env = serve_env(index=sample_index, device="cpu", workers=2, port=port, host="127.0.0.1")
    with socket.create_server(("127.0.0.1", port)):
        done = subprocess.run(MRL_SERVE, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("mrl: error:") == 1 and f"port {port} on 127.0.0.1 is taken" in done.stderr, done.stderr


def test_workers_share_the_cores_unless_encoder_threads_is_set():
    from core.machine import usable_cpus
    from service.settings import ServiceSettings
    from service.workers import share_cores

    shared = share_cores(ServiceSettings(index="x", workers=2))
    assert shared.encoder_threads == max(1, usable_cpus() // 2)
    assert share_cores(ServiceSettings(index="x", workers=64)).encoder_threads == 1
    assert share_cores(ServiceSettings(index="x", workers=2, encoder_threads=3)).encoder_threads == 3
