"""Noticing a stalled or lost rank in a multi-process run, instead of hanging on it.

Every rank runs a daemon thread that rewrites a small heartbeat file,
``<folder>/rank-<r>.json``, every few seconds: its pid and host, a counter, the
phase it is in (``setup_data``, ``training step 12``, ...) and how long it has
been there. The same thread reads the other ranks' files and decides:

* a rank whose counter has not moved for ``timeout`` seconds, whose process is
  gone (same host only), or that wrote ``failed`` is *lost*: this rank logs
  which one and its last phase, marks itself failed and exits with
  ``EXIT_RANK_LOST`` rather than waiting forever in a collective;
* a live rank that has stayed in one phase for longer than ``timeout`` is
  *stalled*: every rank logs who is waiting in which phase and who is behind,
  once per ``timeout``, and keeps waiting (a long cache build is legitimate).

The last heartbeat says ``finished`` or ``failed``; after a clean run rank 0
removes the folder (``distributed.close_watchdog``), a failed run leaves it.

The counter is compared against this rank's own clock, so the hosts' clocks
need not agree. The folder must be visible to every rank; the output directory
is (multi-node training requires it to be shared storage).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger("simpletuner.watchdog")

ENV_TIMEOUT = "SIMPLETUNER_WATCHDOG_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
EXIT_RANK_LOST = 3

RUNNING, FINISHED, FAILED = "running", "finished", "failed"


def timeout_from_environment(environ) -> float:
    """Seconds from SIMPLETUNER_WATCHDOG_TIMEOUT (default 600)."""
    raw = environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} must be a number of seconds above 0, for example "
                         f"{ENV_TIMEOUT}=600.")
    return value


def host_identity() -> str:
    """Host name plus boot id: two containers with one host name on different machines stay apart."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    suffix = boot.read_text().strip()[:8] if boot.exists() else ""
    return f"{socket.gethostname()}/{suffix}" if suffix else socket.gethostname()


def process_alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (killed, not yet reaped by its launcher)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Heartbeat:
    rank: int
    pid: int
    host: str
    beat: int = 0
    phase: str = "starting"
    phase_index: int = 0  # how many phases this rank has entered; a lower number is behind
    phase_seconds: float = 0.0
    status: str = RUNNING
    detail: str = ""

    def describe(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host.split('/')[0]})"


@dataclass
class _Seen:
    beat: int
    since: float  # this rank's monotonic time when the beat last changed


class Watchdog:
    """Heartbeat writer and peer monitor for one rank; use as a context manager around the run."""

    def __init__(self, folder: str | os.PathLike, rank: int, world_size: int, timeout: float,
                 on_lost: Callable[[str], None] | None = None, interval: float | None = None):
        self.folder = Path(folder)
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self.interval = interval if interval is not None else min(5.0, max(0.2, self.timeout / 10))
        self.on_lost = on_lost or _exit_now
        self.me = Heartbeat(rank=rank, pid=os.getpid(), host=host_identity())
        self._phase_started = time.monotonic()
        self._started = time.monotonic()
        self._seen: dict[int, _Seen] = {}
        self._last_stall_report = float("-inf")
        self._lost_reported = False
        self._lock = threading.RLock()  # the SIGTERM handler may run while the main thread holds it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_sigterm = None

    # --- what the trainer calls ---
    def enter(self, phase: str) -> None:
        with self._lock:
            self.me.phase = phase
            self.me.phase_index += 1
            self._phase_started = time.monotonic()

    def start(self) -> "Watchdog":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._loop, name="simpletuner-watchdog", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def stop(self, status: str = FINISHED, detail: str = "") -> None:
        """Final heartbeat with ``status``; later calls do nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval * 4 + 1)
        with self._lock:
            self.me.status, self.me.detail = status, detail
        self._write()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.stop(FINISHED)
            return
        lost = self.lost_ranks()
        if lost:
            self._report_lost(lost, exit_after=False)
        self.stop(FAILED, f"{kind.__name__}: {error}"[:500])

    # --- heartbeats ---
    def _path(self, rank: int) -> Path:
        return self.folder / f"rank-{rank}.json"

    def _write(self) -> None:
        with self._lock:
            self.me.beat += 1
            self.me.phase_seconds = round(time.monotonic() - self._phase_started, 2)
            payload = json.dumps(asdict(self.me))
        path = self._path(self.rank)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(payload)
            os.replace(temporary, path)
        except OSError as error:  # a full or flaky disk must not kill training; peers will notice silence
            logger.warning("watchdog: could not write heartbeat %s: %s", path, error)

    def read_peers(self) -> dict[int, Heartbeat]:
        peers = {}
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                peers[rank] = Heartbeat(**json.loads(self._path(rank).read_text()))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError) as error:
                logger.debug("watchdog: unreadable heartbeat of rank %d: %s", rank, error)
        return peers

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
            self.check()

    # --- decisions ---
    def check(self) -> None:
        """One monitoring pass: exit on a lost rank, log a stall."""
        lost = self.lost_ranks()
        if lost:
            self._report_lost(lost, exit_after=True)
            return
        self._report_stall()

    def lost_ranks(self) -> list[str]:
        """One sentence per lost rank, naming it and its last phase."""
        now = time.monotonic()
        peers = self.read_peers()
        problems = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            peer = peers.get(rank)
            if peer is None:
                if now - self._started > self.timeout:
                    problems.append(f"rank {rank} never wrote a heartbeat in {now - self._started:.0f}s")
                continue
            problem = self._peer_problem(peer, now)
            if problem:
                problems.append(f"{peer.describe()} {problem}; its last phase was '{peer.phase}'")
        return problems

    def _peer_problem(self, peer: Heartbeat, now: float) -> str | None:
        seen = self._seen.get(peer.rank)
        if seen is None or seen.beat != peer.beat:
            seen = self._seen[peer.rank] = _Seen(peer.beat, now)
        if peer.status == FINISHED:
            return None
        if peer.status == FAILED:
            return f"failed ({peer.detail})"
        if peer.host == self.me.host and not process_alive(peer.pid):
            return "exited without finishing"
        if now - seen.since > self.timeout:
            return f"has sent no heartbeat for {now - seen.since:.0f}s"
        return None

    def stall_report(self) -> str | None:
        """Who waits in which phase and who is behind, when some live rank has been stuck past the timeout."""
        with self._lock:
            mine = Heartbeat(**asdict(self.me))
            mine.phase_seconds = time.monotonic() - self._phase_started
        ranks = sorted([mine, *self.read_peers().values()], key=lambda h: h.rank)
        running = [h for h in ranks if h.status == RUNNING]
        if not any(h.phase_seconds > self.timeout for h in running):
            return None
        furthest = max(h.phase_index for h in running)
        behind = [h for h in running if h.phase_index < furthest]
        waiting = [h for h in running if h.phase_index == furthest]

        def listing(group):
            return ", ".join(f"rank {h.rank} in '{h.phase}' for {h.phase_seconds:.0f}s" for h in group)

        if behind:
            return f"no progress past the watchdog timeout: {listing(waiting)} waiting on {listing(behind)}"
        return f"no progress past the watchdog timeout: {listing(waiting)} (all ranks in the same phase)"

    def _report_stall(self) -> None:
        now = time.monotonic()
        if now - self._last_stall_report < self.timeout:
            return
        report = self.stall_report()
        if report:
            self._last_stall_report = now
            logger.warning("[rank %d] watchdog: %s", self.rank, report)

    def _report_lost(self, lost: list[str], exit_after: bool) -> None:
        with self._lock:
            if self._lost_reported:
                return
            self._lost_reported = True
            self.me.status, self.me.detail = FAILED, "lost " + "; ".join(lost)
        message = (f"[rank {self.rank}] watchdog: lost {'; '.join(lost)}. Stopping this rank instead of waiting "
                   f"on it (phase '{self.me.phase}'). Resume from the last checkpoint once the cause is fixed.")
        logger.error(message)
        self._write()
        if exit_after:
            self.on_lost(message)

    def _on_sigterm(self, signum, frame) -> None:
        """The launcher stops the survivors when one rank dies: say which one before going."""
        lost = self.lost_ranks()
        if lost:
            self._report_lost(lost, exit_after=False)
        raise SystemExit(EXIT_RANK_LOST if lost else 128 + signum)


class NullWatchdog:
    """Single-process runs: nothing to watch."""

    def enter(self, phase: str) -> None:
        pass

    def __enter__(self) -> "NullWatchdog":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        return None


def _exit_now(message: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_RANK_LOST)
