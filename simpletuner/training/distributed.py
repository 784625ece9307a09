"""Helpers the trainer uses when several processes train together (data parallel through accelerate).

* ``init_process_state``: accelerate's process state with the collective
  timeout, on gloo when the machine has no GPU.
* ``BatchShard``: random draws for the whole global batch, so every rank uses
  its own rows and N processes with batch b train exactly like one process
  with batch N*b.
* ``start_watchdog`` / ``SampleIdLog``: diagnostics for stalls, lost ranks and
  which samples each rank trained on.

FSDP2 and DeepSpeed (sharded models) live in ``sharding.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch

from simpletuner.config.errors import ConfigError
from simpletuner.training.watchdog import NullWatchdog, Watchdog, timeout_from_environment

logger = logging.getLogger("simpletuner.distributed")

# Set by every launcher (torchrun, accelerate launch, mpirun) in the processes it starts.
LAUNCHED_MARKERS = ("LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "ACCELERATE_DYNAMO_BACKEND")
SAMPLE_ID_ENV = "SIMPLETUNER_LOG_SAMPLE_IDS"
WATCHDOG_FOLDER = ".watchdog"
# Collectives may legitimately wait long (rank 0 building caches); the watchdog catches lost ranks sooner.
MIN_COLLECTIVE_TIMEOUT = 5400.0


# --- launching ---------------------------------------------------------------------------------
def launched_by_launcher(environ: Mapping[str, str]) -> bool:
    """True inside a process that a distributed launcher started (never launch again from there)."""
    return any(environ.get(name, "") != "" for name in LAUNCHED_MARKERS)


def world_size_from_environment(environ: Mapping[str, str]) -> int:
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 1


def adopt_local_rank(settings, environ) -> None:
    """Legacy launchers pass ``--local_rank N`` instead of setting LOCAL_RANK; accelerate reads the variable."""
    local_rank = settings.local_rank
    if local_rank is not None and int(local_rank) >= 0 and not environ.get("LOCAL_RANK"):
        environ["LOCAL_RANK"] = str(int(local_rank))


# --- the accelerator ------------------------------------------------------------------------------
def collective_timeout(environ: Mapping[str, str]) -> float:
    return max(MIN_COLLECTIVE_TIMEOUT, 2 * watchdog_timeout(environ))


def watchdog_timeout(environ: Mapping[str, str]) -> float:
    try:
        return timeout_from_environment(environ)
    except ValueError as error:
        raise ConfigError("SIMPLETUNER_WATCHDOG_TIMEOUT", str(error)) from None


def init_process_state(environ: Mapping[str, str] = os.environ) -> None:
    """Start accelerate's process state before the ``Accelerator`` is built, in multi-process runs only:
    with the collective timeout, and on gloo when there is no GPU (accelerate would otherwise not
    notice the other CPU processes)."""
    if world_size_from_environment(environ) <= 1:
        return
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    PartialState(cpu=cpu, timeout=timedelta(seconds=collective_timeout(environ)))


# --- random draws ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchShard:
    """Rows ``rank*b : (rank+1)*b`` of a global batch of ``world_size*b`` samples.

    Random tensors are drawn for the global batch from one generator seeded the
    same on every rank, and each rank keeps its rows: ranks get different noise,
    and the run equals a single process training on the global batch.
    """

    rank: int = 0
    world_size: int = 1

    def global_like(self, local: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the global batch (values unset: only its shape, dtype and device are used)."""
        if self.world_size == 1:
            return local
        return local.new_empty((local.shape[0] * self.world_size, *local.shape[1:]))

    def rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's rows of tensors drawn for the global batch."""
        if self.world_size == 1:
            return tensors
        return tuple(t.chunk(self.world_size)[self.rank] for t in tensors)


def noise_shard(accelerator, settings) -> BatchShard:
    """With seed_for_each_device (the default) ranks take their rows of the global draws; without it every
    rank draws the same noise for its own samples, as that option's documentation says."""
    if not settings.seed_for_each_device:
        return BatchShard()
    return BatchShard(accelerator.process_index, accelerator.num_processes)


# --- diagnostics ----------------------------------------------------------------------------------
def start_watchdog(accelerator, settings, environ: Mapping[str, str] = os.environ):
    """A started-on-enter Watchdog for multi-process runs, a no-op otherwise.

    Every run gets a fresh heartbeat folder under output_dir/.watchdog (rank 0
    picks its name and removes earlier runs' folders).
    """
    if accelerator.num_processes <= 1:
        return NullWatchdog()
    from accelerate.utils import broadcast_object_list

    root = Path(settings.output_dir) / WATCHDOG_FOLDER
    token = [None]
    if accelerator.is_main_process:
        _remove_old_heartbeats(root)
        token[0] = uuid.uuid4().hex[:12]
    broadcast_object_list(token, from_process=0)
    timeout = watchdog_timeout(environ)
    logger.debug("rank %d: watchdog timeout %.0fs, heartbeats in %s", accelerator.process_index, timeout,
                 root / token[0])
    return Watchdog(root / str(token[0]), accelerator.process_index, accelerator.num_processes, timeout)


def _remove_old_heartbeats(root: Path) -> None:
    if root.is_dir():
        shutil.rmtree(root)


def close_watchdog(watchdog, accelerator) -> None:
    """End of a clean run: every rank's last heartbeat says finished, then rank 0 removes the folder."""
    if not isinstance(watchdog, Watchdog):
        return
    watchdog.stop()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _remove_old_heartbeats(watchdog.folder.parent)


def sample_ids_wanted(environ: Mapping[str, str]) -> bool:
    return (environ.get(SAMPLE_ID_ENV, "").lower() in ("1", "true", "yes")
            or environ.get("SIMPLETUNER_LOG_LEVEL", "").upper() == "DEBUG")


class SampleIdLog:
    """One JSON line per micro-batch: {"step", "micro_step", "rank", "samples"}.

    Written to output_dir/debug/sample_ids-rank<r>.jsonl when
    SIMPLETUNER_LOG_SAMPLE_IDS=1 or SIMPLETUNER_LOG_LEVEL=DEBUG; appended to on
    resume. Each line is flushed as written, so a killed rank leaves whole lines.
    """

    def __init__(self, path: str | os.PathLike | None, rank: int = 0):
        self.path, self.rank = (Path(path) if path else None), rank
        self._handle = None

    @classmethod
    def for_run(cls, settings, rank: int, environ: Mapping[str, str] = os.environ) -> "SampleIdLog":
        if not sample_ids_wanted(environ):
            return cls(None, rank)
        return cls(Path(settings.output_dir) / "debug" / f"sample_ids-rank{rank}.jsonl", rank)

    def record(self, step: int, micro_step: int, sample_ids: list[str]) -> None:
        if self.path is None:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        line = {"step": step, "micro_step": micro_step, "rank": self.rank, "samples": list(sample_ids)}
        self._handle.write(json.dumps(line) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def log_cache_work(data, rank: int) -> None:
    """Say how many latents this rank encoded: rank 0 builds the caches, the others reuse them."""
    encoded = sum(state.build.encoded for state in data.datasets.values() if state.build is not None)
    logger.info("rank %d: encoded %d latents into the caches", rank, encoded)
