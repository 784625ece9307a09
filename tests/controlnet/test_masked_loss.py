"""Mask conditioning in the loss: a training step's loss is the mean over the masked-in latent cells only."""

from __future__ import annotations

import pytest
import torch

from helpers.conditioning_data import make_half_masks, write_conditioning_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A loaded tiny sd1x, and the first batch of a dataset whose masks hide the left half of every image."""
    from simpletuner.config.settings import Settings
    from simpletuner.data.pipeline import prepare_data
    from simpletuner.demo.sample_data import make_sample_images
    from simpletuner.models.registry import get_family
    from simpletuner.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("masked")
    make_sample_images(str(root / "images"), count=4)
    masks = make_half_masks(root / "images", root / "masks")
    config = write_conditioning_dataset(root, root / "images", {"masks": (masks, "mask")})
    settings = Settings({"model_family": "sd1x", "pretrained_model_name_or_path": build_tiny("sd1x", str(root / "m")),
                         "data_backend_config": str(config), "train_batch_size": 2, "seed": 4, "resolution": 64,
                         "resolution_type": "pixel"})
    family = get_family("sd1x")(settings)
    family.load(torch.device("cpu"), torch.float32)
    batch = prepare_data(settings, family=family, progress=False).next_batch().batch
    return settings, family, batch


def recorded_loss(settings, family, batch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LossStep's loss and the prediction it scored."""
    from simpletuner.training.loss_step import LossStep

    seen = {}

    class Recording:
        def __getattr__(self, name):
            return getattr(family, name)

        def predict(self, *args):
            seen["prediction"] = family.predict(*args)
            return seen["prediction"]

    loss = LossStep(Recording(), settings, torch.float32)(batch, 0, torch.Generator().manual_seed(seed))
    return loss, seen["prediction"]


def test_first_step_loss_equals_the_manual_masked_mean(setup):
    from simpletuner.training.noise import make_noise

    settings, family, batch = setup
    assert batch.loss_mask is not None and batch.loss_mask.shape[1] == 1
    with torch.no_grad():
        loss, prediction = recorded_loss(settings, family, batch, seed=11)
    target = make_noise(batch.latents.float(), settings, torch.Generator().manual_seed(11))  # epsilon target
    cells = torch.nn.functional.avg_pool2d(batch.loss_mask, 8).expand_as(prediction)  # the VAE's 8x8 cells
    assert cells[..., : cells.shape[-1] // 2].max() == 0  # the left half is masked out
    squared = (prediction.float() - target) ** 2
    manual = ((squared * cells).sum(dim=(1, 2, 3)) / cells.sum(dim=(1, 2, 3))).mean()
    assert torch.allclose(loss, manual, rtol=1e-5)
    assert not torch.allclose(loss, squared.mean(), rtol=1e-3), "the mask changed nothing"


def test_masked_out_cells_get_no_gradient(setup):
    settings, family, batch = setup
    with torch.no_grad():
        _, prediction = recorded_loss(settings, family, batch, seed=12)
    from simpletuner.training import losses

    scored = prediction.detach().clone().requires_grad_(True)
    target = torch.zeros_like(scored)
    loss = losses.diffusion_loss(scored, target, torch.full((scored.shape[0],), 500), family.components.noise_scheduler,
                                 settings, family.prediction_type(), mask=batch.loss_mask)
    loss.backward()
    left, right = scored.grad[..., : scored.shape[-1] // 2], scored.grad[..., scored.shape[-1] // 2:]
    assert left.abs().max() == 0 and right.abs().max() > 0
