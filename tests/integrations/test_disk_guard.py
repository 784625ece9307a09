"""Disk guard: size parsing, and the stop / wait / script actions against a controllable free-space reading."""

from __future__ import annotations

import stat

import pytest

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.integrations.disk_guard import (DiskGuard, DiskSpaceLow, disk_guard_callback, disk_guard_errors,
                                                 existing_folder, free_bytes, parse_size)

GIB = 1024**3


@pytest.mark.parametrize("text, expected", [("500K", 500 * 1024), ("50M", 50 * 1024**2), ("100G", 100 * GIB),
                                            ("1T", 1024**4), ("2048", 2048), ("1.5g", int(1.5 * GIB)),
                                            ("10GB", 10 * GIB), ("10 GiB", 10 * GIB)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "10X", "-5G", "G"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError):
        parse_size(text)


class Readings:
    """Free-space readings handed out one per measurement (the last one repeats)."""

    def __init__(self, *values: int):
        self.values = list(values)
        self.paths: list[str] = []

    def __call__(self, path: str) -> int:
        self.paths.append(path)
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def test_enough_space_does_nothing():
    readings = Readings(20 * GIB)
    DiskGuard("/out", "10G", measure=readings).check()
    assert readings.paths == ["/out"]


def test_stop_raises_a_config_error_naming_free_space_and_threshold(tmp_path):
    with pytest.raises(DiskSpaceLow) as caught:
        DiskGuard(str(tmp_path), "10G", "stop", measure=Readings(3 * GIB)).check()
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and caught.value.key == "disk_low_threshold"
    assert "3.0 GiB free" in message and "disk_low_threshold=10G (10.0 GiB)" in message and str(tmp_path) in message


def test_wait_polls_until_space_returns():
    sleeps: list[float] = []
    readings = Readings(1 * GIB, 2 * GIB, 11 * GIB)
    DiskGuard("/out", "10G", "wait", measure=readings, sleep=sleeps.append, poll_s=30).check()
    assert sleeps == [30, 30] and len(readings.paths) == 3


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "cleanup.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_script_runs_and_training_continues_when_it_frees_space(tmp_path):
    marker = tmp_path / "ran"
    guard = DiskGuard("/out", "10G", "script", _script(tmp_path, f"touch {marker}"), measure=Readings(1 * GIB, 12 * GIB))
    guard.check()
    assert marker.exists()


@pytest.mark.parametrize("body, after, fragment", [("exit 3", 12 * GIB, "exited with status 3"),
                                                   ("true", 1 * GIB, "did not free enough space")])
def test_script_failure_or_too_little_space_stops(tmp_path, body, after, fragment):
    guard = DiskGuard("/out", "10G", "script", _script(tmp_path, body), measure=Readings(1 * GIB, after))
    with pytest.raises(DiskSpaceLow, match=fragment):
        guard.check()


def test_missing_output_dir_is_measured_at_its_nearest_parent(tmp_path):
    assert existing_folder(str(tmp_path / "not" / "yet")) == str(tmp_path)
    assert free_bytes(str(tmp_path / "not" / "yet")) > 0


def test_settings_checks_and_factory():
    assert disk_guard_callback(Settings()) is None
    assert disk_guard_errors(Settings({"disk_low_threshold": "lots"}))[0].key == "disk_low_threshold"
    errors = disk_guard_errors(Settings({"disk_low_threshold": "1G", "disk_low_action": "script"}))
    assert errors[0].key == "disk_low_script"
    guard = disk_guard_callback(Settings({"disk_low_threshold": "1M", "disk_low_action": "wait", "output_dir": "/o"}))
    assert (guard.threshold, guard.action, guard.path) == (1024**2, "wait", "/o")
