"""Renders documentation/families/<family>.md from each family's declared facts.

Run `python -m simpletuner.models.docs` after adding or changing a family; a test fails
when a page is stale. The prose comes from the family class's docstring.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from simpletuner.models.registry import available_families, get_family

OUTPUT_DIR = Path(__file__).resolve().parents[2] / "documentation" / "families"


def render(name: str) -> str:
    family = get_family(name)
    prediction = family.default_prediction_type
    lines = [f"# {name}", "", inspect.cleandoc(family.__doc__ or "").strip(), "",
             "Generated from the family's class by `python -m simpletuner.models.docs`.", "",
             "| fact | value |", "|---|---|",
             f"| `model_family` | `{name}` |",
             f"| default `model_flavour` | `{family.default_flavour}` |",
             f"| prediction | `{prediction}`{' (flow matching)' if family.flow_matching else ''} |",
             f"| trained module | `{family.denoiser_subfolder}` |",
             f"| text encoders | {', '.join(f'`{a}`' for a in family.text_encoder_attributes) or 'none'} |",
             f"| default LoRA targets | {', '.join(f'`{t}`' for t in family.default_lora_targets)} |",
             f"| diffusers pipeline | `{family.pipeline_class.__name__}` |",
             f"| channel control (`control=true`) | {_channel_control(name)} |",
             f"| `.gguf` denoiser file (QUANTISATION.md) | "
             f"{', '.join(f'`{option}`' for option in family.gguf_options) or 'not available'} |", "",
             "## Flavours", "", "| model_flavour | base model |", "|---|---|"]
    lines += [f"| `{flavour}` | `{path}` |" for flavour, path in family.flavours.items()]
    lines += ["", "Set `pretrained_model_name_or_path` to use another checkpoint of the same architecture "
                  "(a hub id or a local diffusers folder).", "",
              "## Loading the result", "", "```python",
              f"from diffusers import {family.pipeline_class.__name__}", "",
              f'pipe = {family.pipeline_class.__name__}.from_pretrained("{family.flavours[family.default_flavour]}")',
              *_adapter_lines(family),
              f'# pipe = {family.pipeline_class.__name__}.from_pretrained("output/my-run")  # model_type=full',
              "```", ""]
    return "\n".join(lines)


def _channel_control(name: str) -> str:
    from simpletuner.training.channel_control import CHANNEL_CONTROL_KINDS

    kind = CHANNEL_CONTROL_KINDS.get(name)
    if kind is None:
        return "not available"
    model_types = "lora, full" if kind.lora else "full"
    return f"`{kind.pipeline_class}` ({model_types}; see CONTROLNET.md)"


def _adapter_lines(family) -> list[str]:
    if hasattr(family.pipeline_class, "load_lora_weights"):
        formats = "PEFT LoRA or lora_format=comfyui" if family.diffusers_loads_comfyui_lora else "PEFT LoRA"
        return [f'pipe.load_lora_weights("output/my-run")  # model_type=lora ({formats})']
    return ["# This pipeline has no LoRA loader: train with lora_type=lycoris and apply the result with lycoris:",
            "from lycoris import create_lycoris_from_weights",
            f"network, _ = create_lycoris_from_weights(1.0, \"output/my-run/pytorch_lora_weights.safetensors\", "
            f"pipe.{family.denoiser_subfolder})",
            "network.merge_to()"]


def pages() -> dict[str, str]:
    return {f"{name}.md": render(name) for name in available_families()}


def main() -> int:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    for filename, text in pages().items():
        (OUTPUT_DIR / filename).write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT_DIR / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
