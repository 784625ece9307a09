"""`simpletuner configure`: the real wizard driven through a pseudo-terminal.

The wizard only asks about options that are built (or required), and the option
table's statuses change as features land, so the new-config tests answer
whatever questions come, from a table keyed by the exact prompt text, and
compute the expected config.json from the live statuses. Tests that need a
fixed set of questions run the wizard in a child that marks options as built
first (``BOOTSTRAP``); that exercises the wizard's own logic, not the trainer's.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from PIL import Image

from simpletuner.config.loader import load_config
from simpletuner.config.option_types import BUILT
from simpletuner.config.options import OPTIONS
from simpletuner.config.validate import validate_settings
from simpletuner.data.dataset_config import load_dataset_config

CLEAR = "\x15"  # Ctrl-U: empty the pre-filled text
DOWN = "\x1b[B"
ENTER = "\r"
CTRL_C = "\x03"
TIMEOUT_S = 40

# Runs `simpletuner <args>` after marking the comma-separated options in argv[1] as built.
BOOTSTRAP = """
import dataclasses, sys
from simpletuner.config import options
from simpletuner.config.option_types import BUILT
for name in filter(None, sys.argv[1].split(",")):
    options.OPTIONS[name] = dataclasses.replace(options.OPTIONS[name], status=BUILT, planned_choices=())
from simpletuner.cli import main
sys.exit(main(sys.argv[2:]))
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _text(answer: str) -> str:
    return CLEAR + answer + ENTER


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "CONFIG_BACKEND", "CONFIG_PATH")}
    env.update(TERM="xterm", COLUMNS="120", LINES="40", PROMPT_TOOLKIT_NO_CPR="1", PYTHONUNBUFFERED="1")
    return env


class Wizard:
    """One `simpletuner configure` process on a pseudo-terminal."""

    def __init__(self, cwd: Path, *args: str, built: tuple[str, ...] = ()):
        start = ["-c", BOOTSTRAP, ",".join(built)] if built else ["-m", "simpletuner"]
        argv = start + ["configure", *args]
        self.transcript = io.StringIO()
        self.child = pexpect.spawn(sys.executable, argv, cwd=str(cwd), env=_child_env(), dimensions=(40, 120),
                                   encoding="utf-8", timeout=TIMEOUT_S)
        self.child.logfile_read = self.transcript

    def screen(self) -> str:
        return ANSI.sub("", self.transcript.getvalue()).replace("\r", "\n")

    def _expect(self, patterns: list[str]) -> int:
        try:
            return self.child.expect_exact(patterns)
        except pexpect.ExceptionPexpect as exc:
            pytest.fail(f"wizard never showed any of {patterns}: {type(exc).__name__}\n--- screen ---\n{self.screen()}")

    def answer(self, prompt: str, keys: str) -> None:
        self._expect([prompt])
        self.child.send(keys)

    def answer_any(self, answers: dict[str, str], until: str) -> list[str]:
        """Answer prompts from ``answers`` in whatever order they appear, until ``until`` shows; returns those seen."""
        pending, seen = dict(answers), []
        while True:
            patterns = [until] + list(pending)
            index = self._expect(patterns)
            if index == 0:
                return seen
            seen.append(patterns[index])
            self.child.send(pending.pop(patterns[index]))

    def exit_status(self) -> int:
        self._expect([pexpect.EOF])
        self.child.close()
        return self.child.exitstatus


def make_images(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (96, 96), (40 * index, 120, 200)).save(folder / f"shape{index}.png")
        (folder / f"shape{index}.txt").write_text(f"a blue square number {index}")
    return folder


def offered(name: str, built: tuple[str, ...] = ()) -> bool:
    return OPTIONS[name].status == BUILT or OPTIONS[name].required or name in built


def expected_config(answers: dict[str, object], built: tuple[str, ...] = ()) -> dict[str, object]:
    """What the wizard must write for these answers: offered options that are required or not at their default."""
    expected = {name: value for name, value in answers.items()
                if offered(name, built) and (OPTIONS[name].required or value != OPTIONS[name].default)}
    steps, epochs = offered("max_train_steps", built), offered("num_train_epochs", built)
    if steps and epochs:  # steps chosen: epochs set to 0 so the step count decides
        expected["num_train_epochs"] = 0
    elif not steps:
        expected.pop("max_train_steps", None)
    return expected


def load(tmp_path: Path, env: str):
    return load_config(["--env", env], environ={}, cwd=str(tmp_path)).settings


SDXL_KEYS = {
    "Config environment name": _text("sd"),
    "Model family": "sdxl" + ENTER,
    "Model flavour": _text("base-1.0"),
    "Base model (Hugging": _text(""),
    "Model type": ENTER,
    "Mixed precision": ENTER,
    "Base model precision": ENTER,
    "LoRA type": ENTER,
    "LoRA rank": _text("8"),
    "Dataset folder (your images)": _text("data/shapes"),
    "Training resolution": _text("64"),
    "How are the images captioned?": ENTER,
    "Dataset repeats": _text("1"),
    "Which optimizer?": "adamw_bf16" + ENTER,
    "Learning rate": _text("1e-4"),
    "Scheduler for the learning rate": ENTER,
    "Train for a number of": ENTER,
    "Training steps": _text("20"),
    "Training epochs": _text("1"),
    "Batch size per GPU": _text("1"),
    "Gradient accumulation steps": _text("1"),
    "Validation prompt": _text("a red square"),
    "Make validation images every N steps": _text("10"),
    "Validation resolution": _text("64x64"),
    "Save a checkpoint every N steps": _text("10"),
    "Report metrics to": ENTER,
    "Output folder": ENTER,
}
SDXL_VALUES = {
    "model_family": "sdxl", "model_flavour": "base-1.0", "model_type": "lora", "lora_type": "standard",
    "lora_rank": 8, "data_backend_config": "config/sd/multidatabackend.json", "optimizer": "adamw_bf16",
    "learning_rate": 1e-4, "lr_scheduler": "constant", "max_train_steps": 20, "train_batch_size": 1,
    "gradient_accumulation_steps": 1, "validation_prompt": "a red square", "validation_step_interval": 10,
    "validation_resolution": "64x64", "checkpoint_step_interval": 10, "report_to": "tensorboard",
    "output_dir": "output/sd", "mixed_precision": "bf16", "base_model_precision": "no_change",
}


def test_new_sdxl_lora_config_loads_validates_and_passes_check(tmp_path):
    make_images(tmp_path / "data" / "shapes")
    wizard = Wizard(tmp_path)
    wizard.answer_any(SDXL_KEYS, until="Write these files?")
    wizard.child.send("y")
    assert wizard.exit_status() == 0, wizard.screen()

    config = json.loads((tmp_path / "config/sd/config.json").read_text())
    assert config == expected_config(SDXL_VALUES)
    settings = load(tmp_path, "sd")
    unbuilt_required = {name for name, option in OPTIONS.items() if option.required and option.status != BUILT}
    assert {error.key for error in validate_settings(settings)} <= unbuilt_required

    old_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        specs = load_dataset_config(settings.data_backend_config, settings)
    finally:
        os.chdir(old_cwd)
    image, text = specs[0], specs[1]
    assert (image.instance_data_dir, image.resolution, image.caption_strategy, image.repeats) == \
        ("data/shapes", 64, "textfile", 1)
    assert image.cache_dir_vae.startswith("cache/") and text.cache_dir.startswith("cache/")
    assert text.dataset_type == "text_embeds" and text.default

    # `simpletuner check`, with the required options the lead has not marked built yet treated as built.
    result = subprocess.run([sys.executable, "-c", BOOTSTRAP, ",".join(sorted(unbuilt_required)), "check",
                             "--env", "sd"], cwd=tmp_path, env=_child_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration OK" in result.stdout and "4 usable" in result.stdout, result.stdout


WIZARD_OPTIONS = tuple(sorted(set(SDXL_VALUES) | {"lycoris_config", "num_train_epochs"}))
FLUX_KEYS = dict(SDXL_KEYS, **{
    "Config environment name": _text("fx"),
    "Model family": "flux" + ENTER,
    "Model flavour": _text("dev"),
    "LoRA type": DOWN + ENTER,  # lycoris
    "Training resolution": _text("512"),
    "How are the images captioned?": DOWN + DOWN + ENTER,  # instanceprompt
    "Instance prompt": _text("a photo of sks"),
    "Which optimizer?": "optimi-lion" + ENTER,
    "Learning rate": _text("4e-5"),
    "Batch size per GPU": _text("2"),
})


def test_new_flux_lycoris_config_asks_every_built_question(tmp_path):
    make_images(tmp_path / "data" / "shapes")
    wizard = Wizard(tmp_path, built=WIZARD_OPTIONS)
    seen = wizard.answer_any(FLUX_KEYS, until="Write these files?")
    wizard.child.send("y")
    assert wizard.exit_status() == 0, wizard.screen()
    assert "LoRA rank" not in seen and "Training epochs" not in seen
    assert "the flux model code is not available yet" in wizard.screen() or "flux" in _available_families()

    config = json.loads((tmp_path / "config/fx/config.json").read_text())
    values = dict(SDXL_VALUES, model_family="flux", model_flavour="dev", lora_type="lycoris",
                  lycoris_config="config/fx/lycoris_config.json", data_backend_config="config/fx/multidatabackend.json",
                  optimizer="optimi-lion", learning_rate=4e-5, train_batch_size=2, output_dir="output/fx")
    del values["lora_rank"]
    assert config == expected_config(values, WIZARD_OPTIONS)
    settings = load(tmp_path, "fx")
    assert (settings.model_family, settings.lora_type, settings.learning_rate) == ("flux", "lycoris", 4e-5)
    assert json.loads((tmp_path / "config/fx/lycoris_config.json").read_text())["algo"] == "lokr"
    datasets = json.loads((tmp_path / "config/fx/multidatabackend.json").read_text())
    assert datasets[0]["caption_strategy"] == "instanceprompt" and datasets[0]["instance_prompt"] == "a photo of sks"
    assert datasets[0]["resolution"] == 512 and datasets[1]["dataset_type"] == "text_embeds"


def _available_families() -> set[str]:
    from simpletuner.wizard.families import available_families

    return available_families()


def _write_existing(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "config" / "mine"
    folder.mkdir(parents=True)
    original = {
        "model_family": "sdxl", "--model_type": "lora", "lora_rank": 16, "--learning_rate": "1e-4",
        "optimizer": "adamw_bf16", "lr_scheduler": "constant", "max_train_steps": 100, "num_train_epochs": 0,
        "data_backend_config": "config/mine/multidatabackend.json", "--output_dir": "output/mine",
    }
    (folder / "config.json").write_text(json.dumps(original, indent=2))
    (folder / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": "data/shapes", "caption_strategy": "textfile"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]))
    return folder, original


def test_edit_changes_only_learning_rate_and_rank(tmp_path):
    folder, original = _write_existing(tmp_path)
    datasets_before = (folder / "multidatabackend.json").read_text()
    wizard = Wizard(tmp_path, "config/mine/config.json", built=tuple(OPTIONS))
    wizard.answer("Which section?", "Optimizer" + ENTER)
    wizard.answer("Which optimizer?", ENTER)
    wizard.answer("Learning rate", _text("3e-4"))
    wizard.answer("Scheduler for the learning rate", ENTER)
    wizard.answer("Which section?", "LoRA" + ENTER)
    wizard.answer("LoRA type", ENTER)
    wizard.answer("LoRA rank", _text("32"))
    wizard.answer("Which section?", "Save and exit" + ENTER)
    wizard.answer("Save these changes?", "y")
    assert wizard.exit_status() == 0, wizard.screen()

    written = json.loads((folder / "config.json").read_text())
    assert list(written) == list(original)  # same keys, same spelling, same order
    changed = {key for key in original if written[key] != original[key]}
    assert changed == {"--learning_rate", "lora_rank"}
    assert written["--learning_rate"] == pytest.approx(3e-4) and written["lora_rank"] == 32
    assert (folder / "multidatabackend.json").read_text() == datasets_before


def test_ctrl_c_midway_writes_nothing(tmp_path):
    wizard = Wizard(tmp_path)
    wizard.answer_any({key: SDXL_KEYS[key] for key in list(SDXL_KEYS)[:9]}, until="Dataset folder (your images)")
    wizard.child.send(CTRL_C)
    wizard._expect(["cancelled, nothing was written."])
    assert wizard.exit_status() == 130, wizard.screen()
    assert not (tmp_path / "config").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_not_replaced_without_asking(tmp_path):
    make_images(tmp_path / "data" / "shapes")
    existing = tmp_path / "config" / "sd" / "config.json"
    existing.parent.mkdir(parents=True)
    existing.write_text('{"model_family": "sd1x"}')
    wizard = Wizard(tmp_path, built=WIZARD_OPTIONS)
    first = ("Config environment name", "Model family")
    rest = first + ("Model flavour",)
    wizard.answer_any({key: SDXL_KEYS[key] for key in first}, until="Model flavour")
    wizard.child.send(_text("base-9"))  # checked against the sdxl family's own flavour list
    wizard.answer("'base-9' is not a sdxl flavour", _text("base-1.0"))
    wizard.answer_any({k: v for k, v in SDXL_KEYS.items() if k not in rest}, until="Replace the existing")
    wizard.child.send("n")
    wizard._expect(["Nothing was written."])
    assert wizard.exit_status() == 1, wizard.screen()
    assert existing.read_text() == '{"model_family": "sd1x"}'
    assert sorted(p.name for p in existing.parent.iterdir()) == ["config.json"]


def test_without_a_terminal_it_refuses_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "simpletuner", "configure"], cwd=tmp_path, env=_child_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "needs a terminal" in result.stderr
    assert list(tmp_path.iterdir()) == []
