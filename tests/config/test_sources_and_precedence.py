"""Config files, environment and command line resolve with the documented precedence, via `simpletuner check --json`."""

from __future__ import annotations

import json

import pytest

from helpers.images import copy_sample_images
from simpletuner.cli import main as cli_main


@pytest.fixture
def project(sample_images, tmp_path, monkeypatch):
    """A folder with a tiny image dataset and no config yet; the cwd of each test."""
    copy_sample_images(sample_images, tmp_path / "data", count=4)
    (tmp_path / "config").mkdir()
    backends = [
        {"id": "images", "type": "local", "instance_data_dir": str(tmp_path / "data"), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32,
         "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": str(tmp_path / "cache" / "text")},
    ]
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    monkeypatch.chdir(tmp_path)
    for name in ("ENV", "CONFIG_BACKEND", "CONFIG_PATH", "TRAINING_NUM_PROCESSES", "MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


BASE = {"model_family": "sdxl", "model_type": "lora", "output_dir": "out", "optimizer": "adamw_bf16",
        "data_backend_config": "config/multidatabackend.json", "max_train_steps": 10, "learning_rate": 1e-4,
        "train_batch_size": 1}


def resolved(capsys, *argv) -> dict:
    code = cli_main(["check", "--json", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_json_with_and_without_dashes(project, capsys):
    config = {("--" + k if i % 2 else k): v for i, (k, v) in enumerate(BASE.items())}
    (project / "config" / "config.json").write_text(json.dumps(config))
    values = resolved(capsys)
    assert values["learning_rate"] == 1e-4 and values["model_family"] == "sdxl" and values["max_train_steps"] == 10


def test_toml_env_folder_and_cli_override(project, capsys):
    folder = project / "config" / "myrun"
    folder.mkdir()
    lines = [f"{k} = {json.dumps(v)}" for k, v in BASE.items()]
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    assert resolved(capsys, "env=myrun")["learning_rate"] == 1e-4
    assert resolved(capsys, "--env", "myrun", "--learning_rate=3e-5")["learning_rate"] == 3e-5


def test_config_env_file_and_process_environment(project, capsys, monkeypatch):
    lines = [f'export {k.upper()}="{v}"' for k, v in BASE.items() if k != "max_train_steps"]
    lines += ["MAX_NUM_STEPS=7", 'export TRAINER_EXTRA_ARGS="--train_batch_size=3"',
              "export MIXED_PRECISION=bf16"]
    (project / "config" / "config.env").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("CONFIG_BACKEND", "env")
    values = resolved(capsys)
    assert values["max_train_steps"] == 7 and values["train_batch_size"] == 3 and values["mixed_precision"] == "bf16"
    monkeypatch.setenv("MIXED_PRECISION", "no")  # environment beats the file
    assert resolved(capsys)["mixed_precision"] == "no"
    assert resolved(capsys, "--mixed_precision=bf16")["mixed_precision"] == "bf16"  # command line beats both


def test_config_backend_json_with_path(project, capsys, monkeypatch):
    (project / "elsewhere.json").write_text(json.dumps(BASE))
    monkeypatch.setenv("CONFIG_BACKEND", "json")
    monkeypatch.setenv("CONFIG_PATH", "elsewhere")
    assert resolved(capsys)["output_dir"] == "out"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"learnin_rate": 1}, "learnin_rate"),  # unknown key, closest name suggested
        ({"train_batch_size": "many"}, "train_batch_size"),  # wrong type
        ({"lr_scheduler": "sometimes"}, "lr_scheduler"),  # outside the choices
        ({"model_family": None}, "model_family"),  # missing required key
        ({"enable_group_offload": True, "enable_model_cpu_offload": True}, "enable_group_offload"),  # exclusion
        ({"diff2flow_loss": True}, "diff2flow_loss"),  # needs diff2flow_enabled
    ],
)
def test_error_classes_exit_2_and_name_the_key(project, capsys, change, key):
    config = {**BASE, **change}
    config = {k: v for k, v in config.items() if v is not None}
    (project / "config" / "config.json").write_text(json.dumps(config))
    assert cli_main(["check"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    if key == "learnin_rate":
        assert "learning_rate" in err


def test_malformed_json_names_path_and_line(project, capsys):
    (project / "config" / "config.json").write_text('{\n  "model_family": "sdxl",\n  oops\n}')
    assert cli_main(["check"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "line 3" in err


def test_unbuilt_option_says_not_implemented(project, capsys):
    (project / "config" / "config.json").write_text(json.dumps({**BASE, "crepa_enabled": True}))
    assert cli_main(["check"]) == 2
    assert "crepa_enabled is not implemented yet" in capsys.readouterr().err


def test_version_and_help(capsys):
    assert cli_main(["--version"]) == 0
    assert "simpletuner" in capsys.readouterr().out
    assert cli_main(["train", "--help"]) == 0
    assert "--model_family" in capsys.readouterr().out
