"""``mrl serve --workers N``: N server processes answering on one port.

The parent loads nothing: it binds the listening sockets (a taken port is one line, as with one
process), then forks N workers that inherit them. Each worker loads its own encoder and opens the
index itself, with its own lease, threads and query cache; the kernel hands each new connection to
whichever worker accepts it first. The parent only supervises:

- start-up: a worker that fails before it is ready (a bad index or model) ends the whole command with
  that worker's one-line error and its exit code; the others are stopped;
- a worker that dies later is replaced (its live gauges are dropped from the metrics);
- SIGTERM or SIGINT is passed to every worker, which finishes its requests within the shutdown
  deadline; SIGHUP is passed on too, and makes every worker reload its index;
- metrics add up across workers through prometheus-client's multiprocess mode: each worker writes its
  samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder unless it is set), and
  ``/metrics`` on any worker reports the sum.

Threads: unless ``encoder_threads`` is set, each worker's encoder gets its share of the usable CPUs
(:func:`share_cores`), so N workers do not run N times as many threads as there are cores.

Memory: FAISS indexes on the CPU are memory-mapped read-only (:meth:`index.backends.FaissIndex.load`)
and the re-scoring vectors are ``.npy`` files mapped the same way, so the workers share one copy of the
index in the page cache. Each worker holds its own model (about 90 MB for MiniLM).

Fork safety: the parent forks before it imports torch, FAISS or prometheus-client, and before it
starts any thread; each worker imports them itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # a worker that keeps dying is restarted less and less often
STOP_GRACE_S = 10.0  # past the shutdown deadline, how long the parent waits before it kills a worker


class WorkersError(ConfigError):
    """``mrl serve --workers`` cannot run with these settings (one line, exit 2)."""


@dataclass
class Worker:
    pid: int
    ready_fd: int  # the parent's end of the pipe the worker writes one byte to once it serves
    started: float = field(default_factory=time.monotonic)
    ready: bool = False


def check_workers(settings: Any) -> None:
    """Refuse what several processes cannot share.

    Raises:
        WorkersError: A writable server (its write-ahead log and writer lock belong to one process), a
            folder index or a model folder that is not there (each worker would say so: the supervisor says
            it once).
    """
    if settings.workers > 1 and settings.writable:
        raise WorkersError(
            "cannot serve: --writable takes one process (the write log belongs to one writer); run the writable "
            "server with --workers 1 and read-only replicas with --workers N"
        )
    if settings.workers > 1 and settings.index is not None:
        from core.errors import MrlError
        from service.sources import check_index

        try:
            if settings.locator().path is not None:  # a folder; an engine's client is not opened before the fork
                check_index(settings)  # a wrong path fails here once, not once per worker
        except MrlError as exc:
            raise WorkersError(f"cannot serve: {exc}") from None
    if settings.workers > 1 and settings.model and _missing_folder(settings.model):
        raise WorkersError(f"cannot serve: cannot load model {settings.model!r}: no such folder")


def _missing_folder(model: str) -> bool:
    """A model written as a path (absolute, ``./``, ``../``, ``~``) that is not there; ``org/name`` may be a hub
    name, which only loading can tell."""
    from pathlib import Path

    path = Path(model).expanduser()
    return model.startswith((".", "~", "/")) and not path.exists()


Listen = Callable[[str, int], list[socket.socket]]
Serve = Callable[..., Awaitable[None]]


def serve_workers(settings: Any, listen: Listen, serve: Serve) -> int:
    """Run ``settings.workers`` worker processes on the settings' port until SIGTERM or SIGINT; the exit code.

    Args:
        settings: The service settings.
        listen: Binds the listening sockets (``service.cli.listening_sockets``).
        serve: Serves the settings on given sockets in one process (``service.cli.serve``).

    Raises:
        ServeError: The port cannot be bound (before any worker starts).
        WorkersError: Settings several workers cannot share.
    """
    check_workers(settings)
    settings = share_cores(settings)
    sockets = listen(settings.host, settings.port)
    metrics_dir, made = multiprocess_dir()
    try:
        return Supervisor(settings, sockets, serve).run()
    finally:
        for sock in sockets:
            sock.close()
        if made:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def share_cores(settings: Any) -> Any:
    """Each worker's encoder threads, unless set: the usable CPUs shared out, at least one each.

    N workers that each took every core would run N times as many encoder threads as cores. Measured on 2
    cores (docs/results.md, `mrl bench latency --workers 1,2`): 2 workers of 1 thread answered 187 req/s
    at 16 in flight against 173 for one process of 2 threads, while 2 workers of 2 threads fell to 145.
    """
    from core.machine import usable_cpus

    if settings.encoder_threads is not None:
        return settings
    return settings.model_copy(update={"encoder_threads": max(1, usable_cpus() // settings.workers)})


def multiprocess_dir() -> tuple[str, bool]:
    """The folder for the workers' metric files, emptied, and whether it was made here (then removed at exit).

    prometheus-client reads ``PROMETHEUS_MULTIPROC_DIR`` when a worker creates its metrics; files left by an
    earlier run would add old counts to the new ones, so the folder is emptied first.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        return given, False
    made = tempfile.mkdtemp(prefix="mrl-metrics-")
    os.environ[MULTIPROC_ENV] = made
    return made, True


class Supervisor:
    """Forks the workers, waits until every one serves, replaces the ones that die, passes signals on."""

    def __init__(self, settings: Any, sockets: list[socket.socket], serve: Serve) -> None:
        self.settings = settings
        self.sockets = sockets
        self.serve = serve
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.failures = 0  # deaths in a row since a worker last became ready
        self._signal_r, self._signal_w = os.pipe()  # signals wake the loop through this pipe
        os.set_blocking(self._signal_w, False)

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for _ in range(self.settings.workers):
                self._start()
            code = self._until_ready()
            if code is not None:
                self._stop_all()
                return code
            address = self.sockets[0].getsockname()
            logger.info("%d workers serving on port %s", len(self.workers), address[1])
            self._supervise()
            self._stop_all()
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._signal_r)
            os.close(self._signal_w)

    def _until_ready(self) -> int | None:
        """Wait until every worker serves; a worker's exit code if one ends first, or 0 after a signal to stop."""
        while not all(worker.ready for worker in self.workers.values()):
            self._wait(1.0)
            if self.stopping:
                return 0
            for pid, code in self._reap():
                logger.debug("worker %d ended with %d before it served", pid, code)
                return code or 1
        return None

    def _supervise(self) -> None:
        while not self.stopping:
            self._wait(1.0)
            for pid, code in self._reap():
                if self.stopping:
                    break
                self._mark_dead(pid)
                self.failures += 1
                delay = RESTART_BACKOFF_S[min(self.failures, len(RESTART_BACKOFF_S)) - 1]
                logger.warning("worker %d ended (exit code %s); a new one starts in %gs", pid, code, delay)
                self._sleep(delay)
                if not self.stopping:
                    self._start()

    def _wait(self, timeout: float) -> None:
        """Sleep until a worker says it serves, a signal arrives, or ``timeout`` s pass."""
        waiting = {worker.ready_fd: worker for worker in self.workers.values() if not worker.ready}
        readable, _, _ = select.select([self._signal_r, *waiting], [], [], timeout)
        for fd in readable:
            if fd == self._signal_r:
                self._handle_signals()
            elif os.read(fd, 1):
                waiting[fd].ready = True
                self.failures = 0
                os.close(fd)
                waiting[fd].ready_fd = -1

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self._wait(left)

    # --- signals --------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._signal_w, bytes([signum]))

    def _handle_signals(self) -> None:
        for signum in os.read(self._signal_r, 64):
            if signum == signal.SIGHUP:
                logger.info("SIGHUP: every worker reloads its index")
                self._signal_all(signal.SIGHUP)
            else:
                self.stopping = True

    def _signal_all(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # --- workers --------------------------------------------------------------------------
    def _start(self) -> None:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            os.close(self._signal_r)
            os.close(self._signal_w)
            os._exit(run_worker(self.serve, self.settings, self.sockets, ready_w))
        os.close(ready_w)
        self.workers[pid] = Worker(pid, ready_r)

    def _reap(self) -> list[tuple[int, int]]:
        """Workers that have ended: ``(pid, exit code)``; a signal's death is 128 + its number."""
        ended = []
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)
            code = os.waitstatus_to_exitcode(status)
            ended.append((pid, code if code >= 0 else 128 - code))
        return ended

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # its live gauges (queue, in flight, …) no longer count

    def _stop_all(self) -> None:
        """SIGTERM to every worker; each finishes within the shutdown deadline, or is killed after it."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + STOP_GRACE_S
        while self.workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for pid in list(self.workers):
            logger.warning("worker %d did not stop within the shutdown deadline: killed", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.workers:
            self._reap()
            time.sleep(0.01)


def run_worker(serve: Serve, settings: Any, sockets: list[socket.socket], ready_fd: int) -> int:
    """One worker: serve on the inherited sockets until SIGTERM; the exit code (2: it could not start)."""
    import asyncio

    from prometheus_client import values

    from core.errors import MrlError

    values.ValueClass = values.get_value_class()  # the metric files of PROMETHEUS_MULTIPROC_DIR, in this process

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own; SIGHUP is the worker's own below

    def ready() -> None:
        os.write(ready_fd, b"r")
        os.close(ready_fd)

    try:
        asyncio.run(serve(settings, sockets=sockets, on_ready=ready))
    except MrlError as exc:
        print(f"mrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except BaseException:  # the worker's traceback, then a code the parent reports
        logger.exception("worker %d failed", os.getpid())
        return 1
    finally:
        sys.stderr.flush()
        sys.stdout.flush()
    return 0
