"""Hook command placeholders, splitting, validation and background runs."""

from __future__ import annotations

import stat
import sys

import pytest

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.integrations.user_scripts import (ScriptRunner, command_words, post_checkpoint_callback,
                                                   script_errors, script_placeholders)


def test_placeholders_cover_run_identity_and_validation_options():
    settings = Settings({"tracker_run_name": "run-a", "model_family": "sdxl", "validation_guidance": 4.5,
                         "hub_model_id": "me/model"})
    values = script_placeholders(settings, local_checkpoint_path="/out/checkpoint-4", global_step=4)
    assert values["local_checkpoint_path"] == "/out/checkpoint-4" and values["global_step"] == 4
    assert values["tracker_run_name"] == "run-a" and values["model_family"] == "sdxl"
    assert values["huggingface_path"] == "me/model" and values["validation_guidance"] == 4.5
    assert values["remote_checkpoint_path"] == ""


def test_words_are_split_before_filling_so_paths_with_spaces_stay_whole():
    words = command_words("/opt/hook.sh '{local_checkpoint_path}' {global_step} {unknown}x",
                          {"local_checkpoint_path": "/my out/checkpoint-2", "global_step": 2})
    assert words == ["/opt/hook.sh", "/my out/checkpoint-2", "2", "x"]


def test_script_errors_name_the_problem(tmp_path):
    def errors(command):
        return script_errors(Settings({"post_checkpoint_script": command}), "post_checkpoint_script")

    assert errors(None) == [] and errors(f"{sys.executable} -c pass {{global_step:05d}}") == []
    assert "was not found" in str(errors(str(tmp_path / "missing.sh") + " {global_step}")[0])
    assert "cannot read the command" in str(errors("hook.sh 'unclosed")[0])
    assert "cannot read the command" in str(errors("hook.sh {0}")[0])


def test_runner_waits_for_background_commands_and_logs_failures(tmp_path, caplog):
    out = tmp_path / "out.txt"
    runner = ScriptRunner("post_checkpoint_script")
    runner.start([sys.executable, "-c", f"import time; time.sleep(0.2); open({str(out)!r}, 'w').write('done')"])
    runner.start([sys.executable, "-c", "raise SystemExit(4)"])
    runner.wait_all()
    assert out.read_text() == "done" and runner.running == []
    assert "post_checkpoint_script exited with status 4" in caplog.text


def test_factory_refuses_a_missing_program(tmp_path):
    assert post_checkpoint_callback(Settings()) is None
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\n")
    settings = Settings({"post_checkpoint_script": f"{script} {{global_step}}"})
    with pytest.raises(ConfigError, match="chmod"):  # not executable yet
        post_checkpoint_callback(settings)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert post_checkpoint_callback(settings) is not None
