"""Every `simpletuner ...` command shown in README.md and documentation/ runs.

The commands are run in-process against a small project (tiny SD 1.x model, a few images,
config/config.json and config/<env>/config.json for the env names the docs use), with one
training step, so what the docs promise is what the CLI does.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from helpers.images import copy_sample_images
from simpletuner.cli import COMMANDS
from simpletuner.cli import main as cli_main
from simpletuner.config.options import canonical_name

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "documentation").rglob("*.md"))]
INTERACTIVE = {"configure"}  # driven through a pseudo-terminal in tests/cli/test_configure.py


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for document in DOCUMENTS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", document.read_text(encoding="utf-8"), re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("simpletuner"):
                    found.append((f"{document.name}: {line}", shlex.split(line)[1:]))
    return found


COMMAND_LINES = documented_commands()


def test_documents_show_commands():
    assert len(COMMAND_LINES) >= 8


@pytest.mark.parametrize("where, argv", COMMAND_LINES, ids=[c[0] for c in COMMAND_LINES])
def test_options_and_subcommands_exist(where, argv):
    if argv and not argv[0].startswith("-"):
        assert argv[0] in COMMANDS, where
    for word in argv:
        if word.startswith("--") and word not in ("--help", "--version", "--json", "--env", "--example"):
            assert canonical_name(word.split("=")[0]) is not None, f"{where}: unknown option {word}"


@pytest.fixture(scope="module")
def project(tiny_model, sample_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("documented")
    model = tiny_model("sd1x")
    copy_sample_images(sample_images, root / "images", count=4)
    datasets = [
        {"id": "images", "type": "local", "instance_data_dir": str(root / "images"), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32, "crop": True,
         "crop_aspect": "square", "crop_style": "center", "cache_dir_vae": str(root / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": str(root / "cache" / "text")},
    ]
    (root / "config").mkdir()
    (root / "config" / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {"model_family": "sd1x", "pretrained_model_name_or_path": model, "model_type": "lora",
              "output_dir": str(root / "output"), "data_backend_config": str(root / "config" / "multidatabackend.json"),
              "optimizer": "adamw_bf16", "learning_rate": 1e-4, "max_train_steps": 1, "train_batch_size": 1,
              "resolution": 64, "resolution_type": "pixel", "mixed_precision": "no", "report_to": "none",
              "resume_from_checkpoint": "none"}
    (root / "config" / "config.json").write_text(json.dumps(config))
    envs = {word.split("=", 1)[1] for _, argv in COMMAND_LINES for word in argv if word.startswith("env=")}
    for env in envs:
        (root / "config" / env).mkdir()
        (root / "config" / env / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("where, argv", [c for c in COMMAND_LINES if c[1] and c[1][0] not in INTERACTIVE],
                         ids=[c[0] for c in COMMAND_LINES if c[1] and c[1][0] not in INTERACTIVE])
def test_documented_command_runs(where, argv, project, monkeypatch, tmp_path):
    for name in ("ENV", "CONFIG_BACKEND", "CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    if argv[:2] == ["examples", "copy"]:
        monkeypatch.chdir(tmp_path)  # copies must not collide between runs
    else:
        monkeypatch.chdir(project)
    if argv[0] == "train" and any(w.startswith("example=") for w in argv):
        pytest.skip("shipped examples train real hub models; `make demo` runs the demo example")
    assert cli_main(argv) == 0, where
