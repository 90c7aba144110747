"""A real standalone Milvus server for the tests, from PyPI's ``milvus`` package (2.3.5), and Milvus Lite.

:func:`running_milvus_server` unpacks the package's server binary into a temporary folder,
writes its ``milvus.yaml`` there (every port chosen free on 127.0.0.1, every component
advertising 127.0.0.1, the embedded etcd bound to 127.0.0.1, data and logs in the same
folder), starts ``milvus run standalone`` in its own process group, waits until pymilvus
can connect, and kills the whole group afterwards. Milvus 2.3 has no setting for the
address its gRPC and metrics listeners bind (they take the wildcard address); the tests
only ever reach it on 127.0.0.1.

The fixtures skip where ``milvus`` or ``pymilvus`` cannot be imported, except in CI
(``CI=true``), which must run them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 3  # after a workload 2.3.5 may not finish a graceful stop; its data is thrown away
# Each Milvus component registers this address in etcd; the default is the first non-loopback one.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


class MilvusServerError(RuntimeError):
    """The server did not start; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_module(name: str, hint: str):
    """Import ``name``; skip the test without it, but fail in CI."""
    try:
        return __import__(name)
    except ImportError as exc:
        message = f"`{name}` cannot be imported ({exc}); install {hint}"
        if in_ci():
            pytest.fail(f"{message}, and CI must run this test")
        pytest.skip(message)


def _write_config(base: Path) -> tuple[int, int]:
    """``milvus.yaml`` and the embedded etcd's config under ``base``; returns (proxy port, metrics port)."""
    import milvus

    config = milvus.MilvusServerConfig(data_dir=str(base))
    ports = {key: free_port() for key in config.configurable_items if key.endswith("_port")}
    config.update(**ports)
    for component in COMPONENTS:
        config.set(f"{component}.ip", LOOPBACK)
    config.resolve()  # writes configs/milvus.yaml; creates logs/ and data/
    etcd_client, etcd_peer = ports["etcd_port"], free_port()
    (base / "configs" / "embedEtcd.yaml").write_text(
        f"listen-client-urls: http://{LOOPBACK}:{etcd_client}\n"
        f"advertise-client-urls: http://{LOOPBACK}:{etcd_client}\n"
        f"listen-peer-urls: http://{LOOPBACK}:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://{LOOPBACK}:{etcd_peer}\n"
        f"initial-cluster: default=http://{LOOPBACK}:{etcd_peer}\n"
    )
    return ports["proxy_port"], free_port()


def _healthy(metrics_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/healthz", timeout=2) as response:
            return b"OK" in response.read()
    except OSError:
        return False


def _connects(uri: str) -> bool:
    from pymilvus import MilvusClient

    try:
        client = MilvusClient(uri=uri, timeout=5)
    except Exception:  # noqa: BLE001 - pymilvus raises several types while the server starts
        return False
    try:
        client.list_collections()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        client.close()


def _log_tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group, then SIGKILL to what is left (2.3.5 may panic on SIGTERM: harmless)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, 9)  # whatever is left of the group
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def running_milvus_server(base: Path | None = None) -> Iterator[str]:
    """Start the ``milvus`` package's standalone server on loopback; yields its URI ``http://127.0.0.1:PORT``.

    Args:
        base: Folder for its binaries, config, data and logs; a new temporary folder if ``None``
            (removed afterwards).

    Raises:
        MilvusServerError: If it exits, or does not answer pymilvus within ``START_TIMEOUT_S``.
    """
    if base is None:
        with tempfile.TemporaryDirectory(prefix="milvus-") as folder:
            with running_milvus_server(Path(folder)) as uri:
                yield uri
        return

    import milvus

    base.mkdir(parents=True, exist_ok=True)
    proxy_port, metrics_port = _write_config(base)
    milvus._initialize_data_files(str(base))  # unpacks bin/milvus and its libraries (~4 s)
    binary = base / "bin" / "milvus"
    env = {
        **os.environ,
        "DEPLOY_MODE": "STANDALONE",
        "METRICS_PORT": str(metrics_port),
        "MILVUS_RUN_DIR": str(base / "run"),
        "ETCD_CONFIG_PATH": str(base / "configs" / "embedEtcd.yaml"),
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(binary.parent), os.environ.get("LD_LIBRARY_PATH")])),
    }
    log = base / "logs" / "milvus-stdout.log"
    uri = f"http://{LOOPBACK}:{proxy_port}"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(binary), "run", "standalone"],
            cwd=base,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_healthy(metrics_port) and _connects(uri)):
            if process.poll() is not None:
                raise MilvusServerError(f"milvus exited with {process.returncode}:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                raise MilvusServerError(f"milvus not ready in {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(0.2)
        yield uri
    finally:
        _stop(process)
        shutil.rmtree(binary.parent, ignore_errors=True)  # 250 MB, unpacked again next time; logs and data stay


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a real standalone Milvus 2.3.5 server on loopback, shared by the session's tests."""
    require_module("pymilvus", "the `milvus` extra: pip install -e '.[milvus]'")
    require_module("milvus", "the `milvus` extra: pip install -e '.[milvus]'")
    with running_milvus_server(tmp_path_factory.mktemp("milvus-server")) as uri:
        yield uri


@pytest.fixture(scope="module")
def milvus_lite_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a fresh Milvus Lite database (a ``.db`` path in a temporary folder), shared by a module's tests.

    Milvus Lite serves each database from a gRPC server on 127.0.0.1 inside this process; it is
    stopped afterwards.
    """
    require_module("pymilvus", "the `milvus` extra: pip install -e '.[milvus]'")
    require_module("milvus_lite", "the `milvus` extra: pip install -e '.[milvus]'")
    uri = str(tmp_path_factory.mktemp("milvus-lite") / "milvus.db")
    yield uri
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)
