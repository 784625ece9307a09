"""Watchdog decisions from heartbeat files, with the other ranks played by hand-written files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from simpletuner.training.watchdog import (FAILED, FINISHED, RUNNING, Heartbeat, Watchdog, host_identity, process_alive,
                                           timeout_from_environment)


def peer(folder, rank, **fields):
    beat = Heartbeat(**{"rank": rank, "pid": os.getpid(), "host": host_identity(), **fields})
    (folder / f"rank-{rank}.json").write_text(json.dumps(asdict(beat)))
    return beat


def watchdog(folder, timeout=30.0):
    lost = []
    dog = Watchdog(folder, rank=0, world_size=2, timeout=timeout, on_lost=lost.append)
    folder.mkdir(exist_ok=True)
    return dog, lost


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_peer_whose_process_is_gone_is_lost(tmp_path):
    dog, lost = watchdog(tmp_path)
    peer(tmp_path, 1, phase="training step 3", pid=dead_pid())
    dog.check()
    assert len(lost) == 1
    assert "lost rank 1" in lost[0] and "exited without finishing" in lost[0] and "training step 3" in lost[0]
    assert json.loads((tmp_path / "rank-0.json").read_text())["status"] == FAILED


def test_a_peer_that_reported_failure_is_lost(tmp_path):
    dog, lost = watchdog(tmp_path)
    peer(tmp_path, 1, status=FAILED, detail="RuntimeError: out of memory")
    dog.check()
    assert "out of memory" in lost[0]


def test_a_silent_peer_is_lost_after_the_timeout(tmp_path):
    dog, lost = watchdog(tmp_path, timeout=0.3)
    peer(tmp_path, 1, host="elsewhere/1234")  # another machine: only its heartbeat counter tells
    dog.check()
    assert lost == []
    time.sleep(0.4)
    dog.check()
    assert "has sent no heartbeat" in lost[0]


def test_a_finished_peer_is_fine(tmp_path):
    dog, lost = watchdog(tmp_path, timeout=0.3)
    peer(tmp_path, 1, status=FINISHED, pid=dead_pid())
    time.sleep(0.4)
    dog.check()
    assert lost == []


def test_a_peer_that_never_started_is_lost_after_the_timeout(tmp_path):
    dog, lost = watchdog(tmp_path, timeout=0.2)
    time.sleep(0.3)
    dog.check()
    assert "rank 1 never wrote a heartbeat" in lost[0]


def test_a_stall_names_who_waits_and_who_is_behind(tmp_path, caplog):
    dog, lost = watchdog(tmp_path, timeout=0.2)
    dog.enter("setup_data")
    dog.enter("training step 5")
    peer(tmp_path, 1, phase="training step 4", phase_index=1, phase_seconds=9.0)
    time.sleep(0.25)
    with caplog.at_level(logging.WARNING, logger="simpletuner.watchdog"):
        dog.check()
    assert lost == []
    message = caplog.records[-1].getMessage()
    assert "rank 0 in 'training step 5'" in message and "waiting on rank 1 in 'training step 4'" in message


def test_the_context_marks_the_end_of_the_run(tmp_path):
    with Watchdog(tmp_path / "beats", rank=1, world_size=2, timeout=30, interval=0.05) as dog:
        dog.enter("train")
        time.sleep(0.2)
        beat = json.loads((tmp_path / "beats" / "rank-1.json").read_text())
        assert beat["status"] == RUNNING and beat["beat"] >= 2 and beat["phase"] == "train"
    assert json.loads((tmp_path / "beats" / "rank-1.json").read_text())["status"] == FINISHED
    with pytest.raises(ValueError):
        with Watchdog(tmp_path / "beats", rank=1, world_size=2, timeout=30):
            raise ValueError("broken batch")
    beat = json.loads((tmp_path / "beats" / "rank-1.json").read_text())
    assert beat["status"] == FAILED and "broken batch" in beat["detail"]


def test_process_alive_and_timeout_parsing():
    assert process_alive(os.getpid()) and not process_alive(dead_pid())
    assert timeout_from_environment({}) == 600.0
    assert timeout_from_environment({"SIMPLETUNER_WATCHDOG_TIMEOUT": "45"}) == 45.0
    with pytest.raises(ValueError, match="SIMPLETUNER_WATCHDOG_TIMEOUT"):
        timeout_from_environment({"SIMPLETUNER_WATCHDOG_TIMEOUT": "soon"})
