"""A local standalone Milvus server from PyPI's ``milvus`` package (2.3.5), for tests, benchmarks and trials.

:class:`LocalMilvusServer` links the package's server binary and libraries into a folder, writes
its ``milvus.yaml`` there (every component advertising 127.0.0.1, the embedded etcd bound to
127.0.0.1, data and logs in the same folder), starts ``milvus run standalone`` in its own process
group and waits until pymilvus can connect. It can be stopped and started again on the same
ports and data (a Milvus outage and its end). Milvus 2.3 has no setting for the address its gRPC
and metrics listeners bind (they take the wildcard address); clients here only ever reach it on
127.0.0.1.

Ports: a server needs a dozen, chosen before it starts and bound by it seconds later. Ports the
kernel hands out (``bind`` to port 0, every outgoing connection) come from its ephemeral range, so
such a port can be taken in between, by another server starting side by side (two pytest-xdist
workers) or by any connection. :func:`reserve_ports` therefore chooses them outside that range,
where the kernel never allocates, and holds a lock file for each (in the temporary folder) for as
long as the server object lives, so that no other process using this module picks them. If
Milvus still reports a port taken, the first start is tried again on fresh ports
(``START_ATTEMPTS`` in all).

The binaries are unpacked (about 250 MB, several seconds of LZMA) once per package version into
the temporary folder and hard-linked into each server's folder, as the package itself keeps one
unpacked copy per version in its default data folder.

Production deployments run Milvus's own images or Helm charts (see the README's "Scaling out").
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import MrlError
from core.servers import LOOPBACK, free_port

__all__ = ["LocalMilvusServer", "MilvusServerError", "free_port", "reserve_ports", "running_milvus_server"]

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 3  # after a workload 2.3.5 may not finish a graceful stop; its data is thrown away
START_ATTEMPTS = 3  # first starts, each on fresh ports, while Milvus reports a port taken
# Each Milvus component registers this address in etcd; the default is the first non-loopback one.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
EXTRA_PORTS = ("etcd_peer_port", "metrics_port")  # set outside the package's template
# Ports are chosen from here up to 65535, outside the kernel's ephemeral range; below lie
# well-known and registered services' ports (Milvus's own defaults among them).
PORT_FLOOR = 20_000
PORT_CEILING = 65_535
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_FALLBACK = (32_768, 65_535)  # no such file: Linux's default start to IANA's end
# The package's own check (`set query_node_port=54325, but bind failed`), Go's and etcd's messages.
PORT_TAKEN = re.compile(r"but bind failed|address already in use", re.IGNORECASE)


class MilvusServerError(MrlError, RuntimeError):
    """The server did not start; the message ends with the tail of its log."""


class PortTaken(MilvusServerError):
    """A port chosen for the server was taken before the server bound it."""


# --- ports ------------------------------------------------------------------------------------


def ephemeral_port_range() -> tuple[int, int]:
    """``(first, last)`` port the kernel allocates for ``bind(0)`` and outgoing connections."""
    try:
        first, last = (int(field) for field in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return EPHEMERAL_FALLBACK
    return first, last


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else getpass.getuser()


def port_lock_folder() -> Path:
    """Where the lock files of reserved ports live: one folder for every process of this user on this machine."""
    folder = Path(tempfile.gettempdir()) / f"mrl-milvus-ports-{_user()}"
    folder.mkdir(exist_ok=True)
    return folder


def _lock(path: Path) -> int | None:
    """A descriptor holding the exclusive lock of ``path``, or ``None`` if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock files; the bind check alone guards
        return os.open(os.devnull, os.O_RDONLY)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def _bindable(port: int) -> bool:
    """Whether ``port`` can be bound on the wildcard address as Milvus binds it: no listener, no lingering socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))  # no SO_REUSEADDR, as the package checks: TIME_WAIT sockets count as taken
        except OSError:
            return False
    return True


class PortReservation:
    """Ports held for one server: each free when chosen, and locked against every other process using this module.

    The locks go with :meth:`release`, or with this object, or with the process.
    """

    def __init__(self, ports: list[int], descriptors: list[int]) -> None:
        self.ports = ports
        self._descriptors = descriptors

    def release(self) -> None:
        while self._descriptors:
            os.close(self._descriptors.pop())

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit; the process's end frees the locks anyway
            pass


def reserve_ports(count: int) -> PortReservation:
    """``count`` distinct ports nobody listens on, outside the kernel's ephemeral range, each locked for this process.

    Where the ephemeral range covers every port from ``PORT_FLOOR`` up, ports are chosen in it: the
    locks and :meth:`LocalMilvusServer.start`'s retries alone guard them then.

    Raises:
        MilvusServerError: If fewer than ``count`` ports are free.
    """
    first, last = ephemeral_port_range()
    everything = range(PORT_FLOOR, PORT_CEILING + 1)
    candidates = [port for port in everything if not first <= port <= last] or list(everything)
    start = random.randrange(len(candidates))  # processes starting together spread out
    folder = port_lock_folder()
    ports: list[int] = []
    descriptors: list[int] = []
    for port in candidates[start:] + candidates[:start]:
        descriptor = _lock(folder / f"{port}.lock")
        if descriptor is None:
            continue
        if not _bindable(port):
            os.close(descriptor)
            continue
        ports.append(port)
        descriptors.append(descriptor)
        if len(ports) == count:
            return PortReservation(ports, descriptors)
    for descriptor in descriptors:
        os.close(descriptor)
    raise MilvusServerError(f"fewer than {count} free ports between {PORT_FLOOR} and {PORT_CEILING}")


# --- configuration and binaries -----------------------------------------------------------


def _port_keys() -> list[str]:
    import milvus

    template = milvus.MilvusServerConfig(data_dir=tempfile.gettempdir())  # reads the template; writes nothing
    return [key for key in template.configurable_items if key.endswith("_port")] + list(EXTRA_PORTS)


def _write_config(base: Path, ports: dict[str, int]) -> None:
    """``milvus.yaml`` and the embedded etcd's config under ``base``, on ``ports``.

    Raises:
        PortTaken: The package's own check found one of them taken.
    """
    import milvus

    config = milvus.MilvusServerConfig(data_dir=str(base))
    config.update(**{key: port for key, port in ports.items() if key not in EXTRA_PORTS})
    for component in COMPONENTS:
        config.set(f"{component}.ip", LOOPBACK)
    try:
        config.resolve()  # binds each port once to check it; writes configs/milvus.yaml; creates logs/ and data/
    except RuntimeError as exc:
        if PORT_TAKEN.search(str(exc)):
            raise PortTaken(str(exc)) from None
        raise
    etcd_client, etcd_peer = ports["etcd_port"], ports["etcd_peer_port"]
    (base / "configs" / "embedEtcd.yaml").write_text(
        f"listen-client-urls: http://{LOOPBACK}:{etcd_client}\n"
        f"advertise-client-urls: http://{LOOPBACK}:{etcd_client}\n"
        f"listen-peer-urls: http://{LOOPBACK}:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://{LOOPBACK}:{etcd_peer}\n"
        f"initial-cluster: default=http://{LOOPBACK}:{etcd_peer}\n"
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """The exclusive lock of ``path``, waiting for it (a no-op where there are no lock files)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def unpacked_binaries() -> Path:
    """The folder of the package's ``milvus`` binary and libraries, unpacked once per package version.

    Unpacked into a private folder and renamed into place under a lock, so that concurrent
    servers (several processes) never see a partial copy and a copy in use is never rewritten.
    """
    import milvus

    cache = Path(tempfile.gettempdir()) / f"mrl-milvus-{milvus.__version__}-{_user()}"
    binaries, done = cache / "bin", cache / "bin" / ".unpacked"
    if done.is_file():
        return binaries
    cache.mkdir(exist_ok=True)
    with _locked(cache / ".lock"):
        if not done.is_file():
            staging = Path(tempfile.mkdtemp(prefix="unpacking-", dir=cache))
            try:
                milvus._initialize_data_files(str(staging))  # writes staging/bin (~4 s)
                shutil.rmtree(binaries, ignore_errors=True)  # an unfinished copy: nobody has linked it
                (staging / "bin").rename(binaries)
                done.touch()
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return binaries


def _link_binaries(target: Path) -> None:
    """Hard links (copies across file systems) in ``target`` to every file of :func:`unpacked_binaries`."""
    target.mkdir(parents=True, exist_ok=True)
    for source in unpacked_binaries().iterdir():
        if source.name.startswith("."):
            continue
        link = target / source.name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        try:
            os.link(source, link)
        except OSError:
            shutil.copy2(source, link)


# --- the process ------------------------------------------------------------------------------


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


def _log_tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:]) or "(no log)"


def _read_from(log: Path, offset: int) -> str:
    """What ``log`` gained after ``offset`` bytes (this start's output alone)."""
    if not log.exists():
        return ""
    with log.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


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

    The ports are chosen at the first start and kept (and held, see :func:`reserve_ports`) while
    this object lives, so a restart serves the same URI and data.
    """

    def __init__(self, base: Path) -> None:
        self.base = Path(base).resolve()  # the binary is started by its path with cwd=base: a relative one breaks
        self.ports: dict[str, int] | None = None
        self.process: subprocess.Popen | None = None
        self._reservation: PortReservation | None = None

    @property
    def uri(self) -> str:
        if self.ports is None:
            raise MilvusServerError("the server has not been started")
        return f"http://{LOOPBACK}:{self.ports['proxy_port']}"

    def start(self) -> str:
        """Start the server (on the ports of the previous start, if any) and wait until it answers; returns its URI.

        A first start that finds a port taken is tried again on fresh ports, ``START_ATTEMPTS`` in all.

        Raises:
            MilvusServerError: If it exits, or does not answer pymilvus within ``START_TIMEOUT_S``, or
                finds a port taken at every attempt (or at a restart, which must keep its ports).
        """
        self.base.mkdir(parents=True, exist_ok=True)
        _link_binaries(self.base / "bin")
        if self.ports is not None:  # a restart keeps the config (the package's port check fails on TIME_WAIT sockets)
            return self._run()
        taken = []
        for _ in range(START_ATTEMPTS):
            try:
                self._configure()
                return self._run()
            except PortTaken as exc:
                taken.append(str(exc).splitlines()[0])
                self.release_ports()
                self.ports = None
                for folder in ("data", "run"):  # etcd's member with the old peer URL, pid files: the next start is new
                    shutil.rmtree(self.base / folder, ignore_errors=True)
        raise MilvusServerError(
            f"milvus found a port taken at each of {START_ATTEMPTS} starts, each on fresh ports: " + "; ".join(taken)
        )

    def _configure(self) -> None:
        """Reserve fresh ports and write the config for them."""
        keys = _port_keys()
        self._reservation = reserve_ports(len(keys))
        self.ports = dict(zip(keys, self._reservation.ports, strict=True))
        _write_config(self.base, self.ports)

    def release_ports(self) -> None:
        """Let other processes choose this server's ports (after its last stop; otherwise when this object goes)."""
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def _run(self) -> str:
        """Start the process on ``self.ports`` and wait until it answers.

        Raises:
            PortTaken: It exited saying a port was in use. MilvusServerError: It exited, or did not answer in time.
        """
        assert self.ports is not None
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
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
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
                code, output = self.process.returncode, _read_from(log, offset)
                self.stop()
                if taken := PORT_TAKEN.search(output):
                    line = output[output.rfind("\n", 0, taken.start()) + 1 :].partition("\n")[0].strip()
                    raise PortTaken(f"milvus exited with {code}: {line[:300]}\n{_log_tail(output)}")
                raise MilvusServerError(f"milvus exited with {code}:\n{_log_tail(output)}")
            if time.monotonic() > deadline:
                self.stop()
                output = _read_from(log, offset)
                raise MilvusServerError(f"milvus not ready in {START_TIMEOUT_S} s:\n{_log_tail(output)}")
            time.sleep(0.2)
        return self.uri

    def stop(self, *, keep_binary: bool = True) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL); data and logs stay in ``base``."""
        if self.process is not None:
            _stop(self.process)
            self.process = None
        if not keep_binary:
            shutil.rmtree(self.base / "bin", ignore_errors=True)  # links: linked again at the next start


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
        server.release_ports()
