"""A local standalone Milvus server from PyPI's ``milvus`` package (2.3.5), for tests, benchmarks and trials.

:class:`LocalMilvusServer` unpacks the package's server binary into a folder, writes its
``milvus.yaml`` there (every port chosen free on 127.0.0.1, every component advertising
127.0.0.1, the embedded etcd bound to 127.0.0.1, data and logs in the same folder), starts
``milvus run standalone`` in its own process group and waits until pymilvus can connect. It
can be stopped and started again on the same ports and data (a Milvus outage and its end).
Milvus 2.3 has no setting for the address its gRPC and metrics listeners bind (they take the
wildcard address); clients here only ever reach it on 127.0.0.1.

Production deployments run Milvus's own images or Helm charts (see the README's "Scaling out").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import MrlError
from core.servers import LOOPBACK, free_port

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 3  # after a workload 2.3.5 may not finish a graceful stop; its data is thrown away
# Each Milvus component registers this address in etcd; the default is the first non-loopback one.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


class MilvusServerError(MrlError, RuntimeError):
    """The server did not start; the message ends with the tail of its log."""


def _write_config(base: Path) -> dict[str, int]:
    """``milvus.yaml`` and the embedded etcd's config under ``base``, on free ports; returns the ports."""
    import milvus

    config = milvus.MilvusServerConfig(data_dir=str(base))
    ports = {key: free_port() for key in config.configurable_items if key.endswith("_port")}
    config.update(**ports)
    ports["etcd_peer_port"], ports["metrics_port"] = free_port(), free_port()
    for component in COMPONENTS:
        config.set(f"{component}.ip", LOOPBACK)
    config.resolve()  # writes configs/milvus.yaml; creates logs/ and data/
    etcd_client, etcd_peer = ports["etcd_port"], ports["etcd_peer_port"]
    (base / "configs" / "embedEtcd.yaml").write_text(
        f"listen-client-urls: http://{LOOPBACK}:{etcd_client}\n"
        f"advertise-client-urls: http://{LOOPBACK}:{etcd_client}\n"
        f"listen-peer-urls: http://{LOOPBACK}:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://{LOOPBACK}:{etcd_peer}\n"
        f"initial-cluster: default=http://{LOOPBACK}:{etcd_peer}\n"
    )
    return ports


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


class LocalMilvusServer:
    """One standalone server in ``base`` (binaries, config, data, logs); :meth:`start` and :meth:`stop` it.

    The ports are chosen at the first start and kept, so a restart serves the same URI and data.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ports: dict[str, int] | None = None
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        if self.ports is None:
            raise MilvusServerError("the server has not been started")
        return f"http://{LOOPBACK}:{self.ports['proxy_port']}"

    def start(self) -> str:
        """Start the server (on the ports of the previous start, if any) and wait until it answers; returns its URI.

        Raises:
            MilvusServerError: If it exits, or does not answer pymilvus within ``START_TIMEOUT_S``.
        """
        import milvus

        self.base.mkdir(parents=True, exist_ok=True)
        if self.ports is None:  # a restart keeps the config (the package's port check fails on TIME_WAIT sockets)
            self.ports = _write_config(self.base)
        milvus._initialize_data_files(str(self.base))  # unpacks bin/milvus and its libraries (~4 s)
        binary = self.base / "bin" / "milvus"
        env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.ports["metrics_port"]),
            "MILVUS_RUN_DIR": str(self.base / "run"),
            "ETCD_CONFIG_PATH": str(self.base / "configs" / "embedEtcd.yaml"),
            "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(binary.parent), os.environ.get("LD_LIBRARY_PATH")])),
        }
        log = self.base / "logs" / "milvus-stdout.log"
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [str(binary), "run", "standalone"],
                cwd=self.base,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_healthy(self.ports["metrics_port"]) and _connects(self.uri)):
            if self.process.poll() is not None:
                raise MilvusServerError(f"milvus exited with {self.process.returncode}:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                self.stop()
                raise MilvusServerError(f"milvus not ready in {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(0.2)
        return self.uri

    def stop(self, *, keep_binary: bool = True) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL); data and logs stay in ``base``."""
        if self.process is not None:
            _stop(self.process)
            self.process = None
        if not keep_binary:
            shutil.rmtree(self.base / "bin", ignore_errors=True)  # 250 MB, unpacked again at the next start


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
    server = LocalMilvusServer(base)
    try:
        yield server.start()
    finally:
        server.stop(keep_binary=False)
