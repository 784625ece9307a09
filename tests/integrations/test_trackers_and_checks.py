"""Tracker selection, missing tracker packages, and the combined integration checks."""

from __future__ import annotations

import pytest

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.integrations.checks import integration_errors
from simpletuner.integrations.trackers import tracker_errors, tracker_init_kwargs, tracker_installed, tracker_names
from simpletuner.training.accelerator import trackers


def test_named_none_and_all():
    assert tracker_names(Settings({"report_to": "none"})) == []
    assert tracker_names(Settings({"report_to": "tensorboard"})) == ["tensorboard"]
    everything = tracker_names(Settings({"report_to": "all"}))
    assert "tensorboard" in everything and "wandb" in everything
    assert ("comet_ml" in everything) == tracker_installed("comet_ml")
    assert tracker_errors(Settings({"report_to": "all"})) == []


@pytest.mark.skipif(tracker_installed("comet_ml"), reason="comet_ml is installed here")
def test_missing_comet_ml_is_refused_with_the_install_command():
    settings = Settings({"report_to": "comet_ml"})
    errors = tracker_errors(settings)
    assert len(errors) == 1 and errors[0].key == "report_to" and "pip install comet_ml" in str(errors[0])
    with pytest.raises(ConfigError, match="pip install comet_ml"):
        trackers(settings)


def test_wandb_gets_the_run_name_and_a_local_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    kwargs = tracker_init_kwargs(Settings({"tracker_run_name": "r1"}), ["wandb"], str(tmp_path / "logs"))
    assert kwargs == {"wandb": {"name": "r1", "dir": str(tmp_path / "logs")}}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert tracker_init_kwargs(Settings(), ["wandb", "tensorboard"], "x") == {"wandb": {"name": "simpletuner-testing"}}


def test_integration_errors_collect_every_problem(tmp_path):
    settings = Settings({"report_to": "tensorboard", "webhook_config": "{broken", "disk_low_threshold": "ten",
                         "post_checkpoint_script": str(tmp_path / "nope.sh")})
    keys = [error.key for error in integration_errors(settings)]
    assert keys == ["webhook_config", "disk_low_threshold", "post_checkpoint_script"]
    assert integration_errors(Settings()) == []
