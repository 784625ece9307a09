"""offload_during_save: the models go to the CPU around each save and come back; the run is unchanged.

This machine trains on the CPU, so a move there changes no device: the tests record the ``.to`` calls and
where each happens relative to the writing of the files.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import base_config, run_trainer
from simpletuner.training import checkpoints, save_offload, trainer as trainer_module

IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)
CPU = torch.device("cpu")


class EventLog:
    """Records ``Module.to`` calls (module class, target), the saves and the offload context, in order."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        original_to = torch.nn.Module.to
        original_checkpoint = checkpoints.save_checkpoint
        original_outputs = trainer_module.save_outputs
        original_context = trainer_module.offloaded_during_save

        def to(module, *args, **kwargs):
            self.events.append((type(module).__name__, str(args[0] if args else kwargs.get("device"))))
            return original_to(module, *args, **kwargs)

        def save_checkpoint(*args, **kwargs):
            self.events.append(("save", "checkpoint"))
            return original_checkpoint(*args, **kwargs)

        def save_outputs(*args, **kwargs):
            self.events.append(("save", "outputs"))
            return original_outputs(*args, **kwargs)

        @contextmanager
        def offloaded_during_save(trainer):
            self.events.append(("context", "enter"))
            with original_context(trainer):
                yield
            self.events.append(("context", "exit"))

        monkeypatch.setattr(torch.nn.Module, "to", to)
        monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
        monkeypatch.setattr(trainer_module, "save_outputs", save_outputs)
        monkeypatch.setattr(trainer_module, "offloaded_during_save", offloaded_during_save)

    def around(self, save: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The moves inside the offload context before ``save`` and after it."""
        index = self.events.index(("save", save))
        start = max(i for i in range(index) if self.events[i] == ("context", "enter"))
        end = min(i for i in range(index, len(self.events)) if self.events[i] == ("context", "exit"))
        return sorted(self.events[start + 1:index]), sorted(self.events[index + 1:end])


MOVED = sorted((name, "cpu") for name in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel",
                                          "CLIPTextModelWithProjection"))


def test_models_wait_on_the_cpu_while_checkpoints_and_results_are_written(tiny_model, images, tmp_path,
                                                                           monkeypatch):
    model = tiny_model("sdxl")
    overrides = {"max_train_steps": 3, "checkpoint_step_interval": 2, "use_ema": True, "ema_device": "accelerator"}
    (tmp_path / "plain").mkdir()
    (tmp_path / "offloaded").mkdir()
    plain = run_trainer(base_config("sdxl", model, tmp_path / "plain", images, **overrides))
    log = EventLog(monkeypatch)
    trainer = run_trainer(base_config("sdxl", model, tmp_path / "offloaded", images, offload_during_save=True,
                                      **overrides))
    assert log.around("checkpoint") == (MOVED, MOVED)
    assert log.around("outputs") == (MOVED, MOVED)
    assert trainer.state.loss_history == pytest.approx(plain.state.loss_history, abs=1e-6)
    # The step after the checkpoint still updated the weights the optimizer holds: the results are the same.
    saved, expected = (load_file(root / "output" / "pytorch_lora_weights.safetensors")
                       for root in (tmp_path / "offloaded", tmp_path / "plain"))
    assert saved.keys() == expected.keys() and all(torch.allclose(saved[k], expected[k]) for k in expected)
    output = tmp_path / "offloaded" / "output"
    assert (output / "checkpoint-2").is_dir() and (output / "pytorch_lora_weights.safetensors").is_file()
    assert (output / "ema" / "pytorch_lora_weights.safetensors").is_file()
    assert all(tensor.device == CPU for tensor in trainer.ema.shadow)


def test_without_the_option_nothing_moves_for_a_save(tiny_model, images, tmp_path, monkeypatch):
    log = EventLog(monkeypatch)
    run_trainer(base_config("sdxl", tiny_model("sdxl"), tmp_path, images, max_train_steps=2,
                            checkpoint_step_interval=1))
    assert log.around("checkpoint") == ([], []) and log.around("outputs") == ([], [])


class TwoPartModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.resident = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        self.streamed = torch.nn.Linear(2, 2)


def test_weights_kept_off_the_training_device_are_left_where_they_are(monkeypatch):
    """Like group offload's parked blocks: only sub-modules wholly on the training device move."""
    model = TwoPartModel()
    model.streamed.to("meta")  # stands for weights an offloading scheme keeps away from the training device
    moved = []
    original_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to",
                        lambda module, *args, **kwargs: moved.append(module) or original_to(module, *args, **kwargs))
    accelerator = SimpleNamespace(unwrap_model=lambda module: module)
    fake = SimpleNamespace(settings=SimpleNamespace(offload_during_save=True), device=CPU, accelerator=accelerator,
                           model=model, components=SimpleNamespace(denoiser=model, vae=None, text_encoders=[]),
                           ema=None)
    with save_offload.offloaded_during_save(fake):
        assert moved == [model.resident]
    assert moved == [model.resident, model.resident]
    assert model.streamed.weight.device.type == "meta"
