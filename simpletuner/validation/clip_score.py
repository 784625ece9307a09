"""CLIP score of rendered images against their prompts (evaluation_type=clip).

The score of one image is the cosine similarity of CLIP's projected image and
text embeddings, floored at 0 (the usual CLIP score divided by 100, so values
near 0.3 are typical for good prompt adherence). A round logs the mean, min,
max and standard deviation as clip/mean, clip/min, clip/max and clip/std.
"""

from __future__ import annotations

import torch
from PIL import Image

from simpletuner.config.errors import ConfigError


class ClipScorer:
    def __init__(self, model_name_or_path: str, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model_name_or_path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        except OSError as exc:
            raise ConfigError("pretrained_evaluation_model_name_or_path",
                              f"pretrained_evaluation_model_name_or_path={model_name_or_path!r} could not be loaded "
                              f"as a CLIP model and processor ({exc}). Give a hub id such as "
                              "openai/clip-vit-large-patch14-336 or a folder saved with save_pretrained.") from exc
        self.device = device

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """One score per (image, prompt) pair, on the CPU."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        inputs = self.processor(text=prompts, images=[image.convert("RGB") for image in images],
                                return_tensors="pt", padding="max_length", truncation=True)
        outputs = self.model(**{name: tensor.to(self.device) for name, tensor in inputs.items()})
        image_embeds = torch.nn.functional.normalize(outputs.image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(outputs.text_embeds.float(), dim=-1)
        return (image_embeds * text_embeds).sum(dim=-1).clamp(min=0).cpu()


def summarize(scores: torch.Tensor) -> dict[str, float]:
    return {
        "clip/mean": float(scores.mean()),
        "clip/min": float(scores.min()),
        "clip/max": float(scores.max()),
        "clip/std": float(scores.std(unbiased=False)),
    }
