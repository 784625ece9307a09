import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from simpletuner.config.settings import Settings
from simpletuner.training import losses


@pytest.fixture
def scheduler():
    return DDPMScheduler()


def batch(seed=0, shape=(4, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


TIMESTEPS = torch.tensor([10, 300, 700, 990])


# --- targets -------------------------------------------------------------------------------
def test_targets_per_prediction_type(scheduler):
    latents, noise = batch()
    assert torch.equal(losses.training_target("epsilon", scheduler, latents, noise, TIMESTEPS), noise)
    assert torch.equal(losses.training_target("sample", scheduler, latents, noise, TIMESTEPS), latents)
    assert torch.equal(losses.training_target("flow_matching", scheduler, latents, noise, TIMESTEPS),
                       noise - latents)
    v = losses.training_target("v_prediction", scheduler, latents, noise, TIMESTEPS)
    assert torch.allclose(v, scheduler.get_velocity(latents, noise, TIMESTEPS))
    ac = scheduler.alphas_cumprod[TIMESTEPS].view(-1, 1, 1, 1)
    assert torch.allclose(v, ac.sqrt() * noise - (1 - ac).sqrt() * latents, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        losses.training_target("x0", scheduler, latents, noise, TIMESTEPS)


def test_compute_snr(scheduler):
    snr = losses.compute_snr(scheduler, TIMESTEPS)
    ac = scheduler.alphas_cumprod[TIMESTEPS]
    assert torch.allclose(snr, ac / (1 - ac))
    assert (snr[:-1] > snr[1:]).all()


# --- plain loss ----------------------------------------------------------------------------
def test_l2_is_mse(scheduler):
    pred, target = batch()
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, Settings({}), "epsilon")
    assert loss.ndim == 0
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, target))


# --- min-SNR -------------------------------------------------------------------------------
def per_sample_mse(pred, target):
    return (pred - target).square().mean(dim=(1, 2, 3))


def test_snr_gamma_epsilon_weights(scheduler):
    pred, target = batch()
    settings = Settings({"snr_gamma": 5.0})
    snr = losses.compute_snr(scheduler, TIMESTEPS)
    expected = (per_sample_mse(pred, target) * torch.minimum(snr, torch.tensor(5.0)) / snr).mean()
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, settings, "epsilon")
    assert torch.allclose(loss, expected)
    # Low-noise samples (snr > gamma) are down-weighted, so the loss drops below plain MSE.
    plain = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, Settings({}), "epsilon")
    assert loss < plain


def test_snr_gamma_v_prediction_weights(scheduler):
    pred, target = batch(1)
    snr = losses.compute_snr(scheduler, TIMESTEPS)
    expected = (per_sample_mse(pred, target) * torch.minimum(snr, torch.tensor(2.0)) / (snr + 1)).mean()
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, Settings({"snr_gamma": 2.0}), "v_prediction")
    assert torch.allclose(loss, expected)


def test_snr_gamma_equals_mse_when_every_weight_is_one(scheduler):
    pred, target = batch(2)
    noisy = torch.tensor([600, 700, 800, 999])  # snr < 1 here, so min(snr, huge) / snr == 1
    assert (losses.compute_snr(scheduler, noisy) < 1).all()
    weighted = losses.diffusion_loss(pred, target, noisy, scheduler, Settings({"snr_gamma": 1e6}), "epsilon")
    assert torch.allclose(weighted, torch.nn.functional.mse_loss(pred, target))


def test_zero_terminal_snr_gives_finite_weight():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    pred, target = batch(3)
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, Settings({"snr_gamma": 5.0}), "epsilon")
    assert torch.isfinite(loss)


def test_soft_min_snr_is_smooth_version_of_hard(scheduler):
    pred, target = batch(4)
    soft = Settings({"use_soft_min_snr": True, "soft_min_snr_sigma_data": 0.5})  # cap = 1 / 0.25 = 4
    snr = losses.compute_snr(scheduler, TIMESTEPS)
    weights = losses.min_snr_weights(scheduler, TIMESTEPS, soft, "epsilon")
    assert torch.allclose(weights, 4.0 / (snr + 4.0))
    hard = losses.min_snr_weights(scheduler, TIMESTEPS, Settings({"snr_gamma": 4.0}), "epsilon")
    assert (weights <= hard + 1e-6).all()
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, soft, "epsilon")
    assert torch.allclose(loss, (per_sample_mse(pred, target) * weights).mean())
    with pytest.raises(ValueError, match="soft_min_snr_sigma_data"):
        losses.min_snr_weights(scheduler, TIMESTEPS, Settings({"use_soft_min_snr": True}), "epsilon")


def test_snr_weighting_skipped_for_flow_matching():
    scheduler = FlowMatchEulerDiscreteScheduler()
    pred, target = batch(5)
    timesteps = torch.tensor([100.0, 400.0, 600.0, 900.0])
    loss = losses.diffusion_loss(pred, target, timesteps, scheduler, Settings({"snr_gamma": 5.0}), "flow_matching")
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, target))


# --- huber / smooth L1 -----------------------------------------------------------------------
def test_huber_matches_l2_for_tiny_residuals(scheduler):
    target = torch.randn(4, 4, 8, 8)
    pred = target + 1e-3 * torch.randn(4, 4, 8, 8)
    l2 = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, Settings({}), "epsilon")
    for schedule in ("constant", "exponential", "snr"):
        huber = Settings({"loss_type": "huber", "huber_schedule": schedule, "huber_c": 0.1})
        loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, huber, "epsilon")
        assert torch.allclose(loss, l2, rtol=1e-3), schedule
    # smooth_l1 is the same curve divided by c: r^2 / c near zero.
    smooth = Settings({"loss_type": "smooth_l1", "huber_schedule": "constant", "huber_c": 0.1})
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, smooth, "epsilon")
    assert torch.allclose(loss, l2 / 0.1, rtol=1e-3)


def test_huber_is_linear_for_large_residuals(scheduler):
    target = torch.zeros(4, 1, 2, 2)
    pred = torch.full((4, 1, 2, 2), 100.0)
    settings = Settings({"loss_type": "huber", "huber_schedule": "constant", "huber_c": 0.1})
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, settings, "epsilon")
    assert loss.item() == pytest.approx(2 * 0.1 * 100, rel=1e-2)


def test_huber_schedules_go_from_one_to_huber_c(scheduler):
    ends = torch.tensor([0, 999])
    for schedule in ("exponential", "snr"):
        settings = Settings({"loss_type": "huber", "huber_schedule": schedule, "huber_c": 0.1})
        c = losses.huber_thresholds(ends, scheduler, settings, "epsilon")
        assert c[0].item() == pytest.approx(1.0, abs=0.02), schedule
        assert c[1].item() == pytest.approx(0.1, abs=0.02), schedule
        middle = losses.huber_thresholds(torch.tensor([500]), scheduler, settings, "epsilon")
        assert 0.1 < middle.item() < 1.0


# --- masked loss -----------------------------------------------------------------------------
def test_masked_loss_ignores_masked_out_pixels(scheduler):
    pred, target = batch(6)
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, :4] = 1.0
    garbage = pred.clone()
    garbage[:, :, 4:] = 1e4  # errors only where the mask is 0
    masked = losses.diffusion_loss(garbage, target, TIMESTEPS, scheduler, Settings({}), "epsilon", mask=mask)
    expected = (pred[:, :, :4] - target[:, :, :4]).square().mean()
    assert torch.allclose(masked, expected)


def test_pixel_mask_is_resized_to_latents(scheduler):
    pred, target = batch(7)
    mask = torch.zeros(4, 1, 64, 64)
    mask[:, :, :, :32] = 1.0
    loss = losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, Settings({}), "epsilon", mask=mask)
    expected = (pred[..., :4] - target[..., :4]).square().mean()
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="mask"):
        losses.diffusion_loss(pred, target, TIMESTEPS, scheduler, Settings({}), "epsilon",
                              mask=torch.ones(4, 8, 8))
