"""Starting values the wizard proposes for each model family.

These are our own choices, guided by the per-family quickstarts: image size the
family was trained at, a learning rate that suits a LoRA (or a full fine-tune),
and modest step counts. The user can change every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyDefaults:
    resolution: int = 1024
    lora_learning_rate: float = 1e-4
    full_learning_rate: float = 1e-5
    lora_rank: int = 16
    optimizer: str = "adamw_bf16"
    lr_scheduler: str = "constant"
    train_batch_size: int = 1
    max_train_steps: int = 2000
    validation_step_interval: int = 200
    checkpoint_step_interval: int = 500
    # Flavour names from the family's guide, used only as a hint when its model code is not available.
    flavour_hint: tuple[str, ...] = ()

    def learning_rate(self, model_type: str) -> float:
        return self.full_learning_rate if model_type == "full" else self.lora_learning_rate

    def validation_resolution(self) -> str:
        return f"{self.resolution}x{self.resolution}"


GENERIC = FamilyDefaults()

FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "sdxl": FamilyDefaults(resolution=1024, lora_learning_rate=1e-4, full_learning_rate=1e-6),
    "sd1x": FamilyDefaults(resolution=512, full_learning_rate=2e-6, train_batch_size=4),
    "sd2x": FamilyDefaults(resolution=768, full_learning_rate=2e-6, train_batch_size=2),
    "legacy": FamilyDefaults(resolution=512, full_learning_rate=2e-6, train_batch_size=4),
    "kolors": FamilyDefaults(resolution=1024, full_learning_rate=1e-6),
    "deepfloyd": FamilyDefaults(resolution=64, lora_learning_rate=5e-5, full_learning_rate=1e-6, train_batch_size=4),
    "flux": FamilyDefaults(resolution=1024, lora_learning_rate=1e-4, lora_rank=16,
                           flavour_hint=("krea", "dev", "schnell", "kontext", "fluxbooru", "libreflux")),
    "sd3": FamilyDefaults(resolution=1024, lora_learning_rate=5e-5, full_learning_rate=5e-6),
    "auraflow": FamilyDefaults(resolution=1024, lora_learning_rate=4e-5, optimizer="optimi-lion",
                               flavour_hint=("pony",)),
    "hidream": FamilyDefaults(resolution=1024, lora_learning_rate=4e-5, optimizer="optimi-lion",
                              lr_scheduler="constant_with_warmup", flavour_hint=("full", "dev")),
    "omnigen": FamilyDefaults(resolution=1024, lora_learning_rate=4e-5, flavour_hint=("v1",)),
    "qwen_image": FamilyDefaults(resolution=1024, lora_learning_rate=5e-5, flavour_hint=("v1.0",)),
    "pixart_sigma": FamilyDefaults(resolution=1024, lora_learning_rate=5e-5, full_learning_rate=5e-6),
    "sana": FamilyDefaults(resolution=1024, lora_learning_rate=5e-5, full_learning_rate=5e-6),
    "lumina2": FamilyDefaults(resolution=1024, lora_learning_rate=1e-4, full_learning_rate=5e-6),
    "cosmos2image": FamilyDefaults(resolution=1024, lora_learning_rate=6e-5),
    "wan": FamilyDefaults(resolution=480, lora_learning_rate=5e-5),
    "ltxvideo": FamilyDefaults(resolution=512, lora_learning_rate=5e-5, lr_scheduler="cosine"),
}


def defaults_for(family: str | None) -> FamilyDefaults:
    return FAMILY_DEFAULTS.get(family or "", GENERIC)
