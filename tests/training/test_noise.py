import math

import pytest
import torch
from diffusers import DDPMScheduler

from simpletuner.config.settings import Settings
from simpletuner.training import noise

T = 1000
N = 20000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- timesteps -----------------------------------------------------------------------------
def test_uniform_timesteps_cover_range_with_mean_near_middle():
    t = noise.sample_timesteps(N, T, Settings({}), gen())
    assert t.dtype == torch.long and t.shape == (N,)
    assert t.min() >= 0 and t.max() <= T - 1
    assert abs(t.float().mean().item() - (T - 1) / 2) < 10


@pytest.mark.parametrize("segmented", [True, False])
def test_later_bias_raises_mean_and_portion_gets_its_share(segmented):
    settings = Settings({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 3.0,
                         "timestep_bias_portion": 0.25, "disable_segmented_timestep_sampling": not segmented})
    t = noise.sample_timesteps(64, T, settings, gen(1))
    draws = torch.cat([noise.sample_timesteps(64, T, settings, gen(i)) for i in range(300)])
    assert t.shape == (64,)
    # Last 250 timesteps carry weight 3 each: 750 / (750 + 750) = half of all draws.
    share = (draws >= 750).float().mean().item()
    assert abs(share - 0.5) < 0.02
    assert draws.float().mean().item() > (T - 1) / 2 + 100


def test_earlier_bias_lowers_mean():
    settings = Settings({"timestep_bias_strategy": "earlier", "timestep_bias_multiplier": 2.0,
                         "timestep_bias_portion": 0.5})
    t = noise.sample_timesteps(N, T, settings, gen())
    share = (t < 500).float().mean().item()
    assert abs(share - 2 / 3) < 0.02
    assert abs(t.float().mean().item() - (2 / 3 * 249.5 + 1 / 3 * 749.5)) < 10


def test_range_bias_concentrates_inside_range():
    settings = Settings({"timestep_bias_strategy": "range", "timestep_bias_begin": 200,
                         "timestep_bias_end": 300, "timestep_bias_multiplier": 9.0})
    weights = noise.timestep_weights(T, settings)
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    assert torch.isclose(weights[250] / weights[100], torch.tensor(9.0))
    assert weights[299] > weights[300]
    t = noise.sample_timesteps(N, T, settings, gen())
    # 100 * 9 / (100 * 9 + 900) = 0.5
    assert abs(((t >= 200) & (t < 300)).float().mean().item() - 0.5) < 0.02


def test_bad_bias_settings_name_the_option():
    with pytest.raises(ValueError, match="timestep_bias_end"):
        noise.timestep_weights(T, Settings({"timestep_bias_strategy": "range", "timestep_bias_begin": 500,
                                            "timestep_bias_end": 400}))
    with pytest.raises(ValueError, match="timestep_bias_multiplier"):
        noise.timestep_weights(T, Settings({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 0.0}))


def test_segmented_batch_spreads_over_the_schedule():
    t = noise.sample_timesteps(10, T, Settings({}), gen(3))
    assert sorted((t // 100).tolist()) == list(range(10))


def test_timesteps_repeat_with_same_seed_and_land_on_device():
    a = noise.sample_timesteps(8, T, Settings({}), gen(5), device="cpu")
    b = noise.sample_timesteps(8, T, Settings({}), gen(5), device=torch.device("cpu"))
    assert torch.equal(a, b)


# --- noise ---------------------------------------------------------------------------------
def test_make_noise_is_standard_gaussian_without_offset():
    latents = torch.zeros(4, 4, 32, 32)
    n = noise.make_noise(latents, Settings({"noise_offset": 0.5}), gen())  # offset_noise is off
    assert n.shape == latents.shape
    assert abs(n.mean().item()) < 0.02 and abs(n.std().item() - 1) < 0.02


def test_noise_offset_adds_per_channel_constant_with_probability():
    latents = torch.zeros(400, 2, 16, 16)
    plain = noise.make_noise(latents, Settings({}), gen(7))
    settings = Settings({"offset_noise": True, "noise_offset": 1.0, "noise_offset_probability": 0.25})
    offset = noise.make_noise(latents, settings, gen(7)) - plain
    per_channel = offset.flatten(2)
    # Constant over the spatial dims of each sample/channel.
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-5)
    applied = (per_channel[:, :, 0].abs() > 0).any(dim=1).float().mean().item()
    assert 0.18 < applied < 0.32
    always = Settings({"offset_noise": True, "noise_offset": 1.0, "noise_offset_probability": 1.0})
    shifted = (noise.make_noise(latents, always, gen(7)) - plain).flatten(2)[:, :, 0]
    assert abs(shifted.std().item() - 1.0) < 0.1


def test_input_perturbation_fades_and_stops():
    base = torch.zeros(2, 4, 64, 64)
    settings = Settings({"input_perturbation": 0.2, "input_perturbation_steps": 100})
    start = noise.perturb_noise(base, settings, 0, gen())
    halfway = noise.perturb_noise(base, settings, 50, gen())
    assert abs(start.std().item() - 0.2) < 0.01
    assert abs(halfway.std().item() - 0.1) < 0.01
    assert noise.perturb_noise(base, settings, 100, gen()) is base
    forever = Settings({"input_perturbation": 0.2})
    assert abs(noise.perturb_noise(base, forever, 10_000, gen()).std().item() - 0.2) < 0.01
    assert noise.perturb_noise(base, Settings({}), 0, gen()) is base


def test_add_noise_matches_scheduler():
    scheduler = DDPMScheduler()
    latents, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ac = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ac.sqrt() * latents + (1 - ac).sqrt() * eps
    assert torch.allclose(noise.add_noise(scheduler, latents, eps, t), expected, atol=1e-5)


# --- flow matching -------------------------------------------------------------------------
def flow(settings_dict, seed=0, n=N, **kwargs):
    return noise.sample_flow_sigmas(n, Settings({"flow_schedule_shift": 1.0, **settings_dict}), gen(seed), **kwargs)


def test_uniform_flow_sigmas_mean_half():
    s = flow({"flow_use_uniform_schedule": True})
    assert s.dtype == torch.float32 and s.shape == (N,)
    assert (s > 0).all() and (s < 1).all()
    assert abs(s.mean().item() - 0.5) < 0.01


def test_shift_above_one_moves_sigmas_up():
    unshifted = flow({"flow_use_uniform_schedule": True})
    shifted = flow({"flow_use_uniform_schedule": True, "flow_schedule_shift": 3.0})
    assert shifted.mean() > unshifted.mean() + 0.1
    assert torch.allclose(shifted, 3 * unshifted / (1 + 2 * unshifted), atol=1e-6)


def test_beta_schedule_mean_matches_alpha_over_sum():
    s = flow({"flow_use_beta_schedule": True, "flow_beta_schedule_alpha": 2.0, "flow_beta_schedule_beta": 6.0})
    assert abs(s.mean().item() - 0.25) < 0.01
    again = flow({"flow_use_beta_schedule": True, "flow_beta_schedule_alpha": 2.0,
                  "flow_beta_schedule_beta": 6.0})
    assert torch.equal(s, again)


def test_sigmoid_scale_widens_spread_around_half():
    narrow, wide = flow({"flow_sigmoid_scale": 0.5}), flow({"flow_sigmoid_scale": 2.0})
    assert abs(narrow.mean().item() - 0.5) < 0.01 and abs(wide.mean().item() - 0.5) < 0.01
    assert wide.std() > narrow.std() * 1.5


def test_auto_shift_follows_resolution():
    settings = {"flow_use_uniform_schedule": True, "flow_schedule_auto_shift": True}
    small = flow(settings, image_seq_len=256)
    large = flow(settings, image_seq_len=4096)
    base = flow({"flow_use_uniform_schedule": True})
    assert torch.allclose(small, noise.shift_sigmas(base, math.exp(0.5)), atol=1e-6)
    assert torch.allclose(large, noise.shift_sigmas(base, math.exp(1.15)), atol=1e-6)
    assert noise.AutoShift().shift_for(2176) == pytest.approx(math.exp(0.825))
    with pytest.raises(ValueError, match="image_seq_len"):
        flow(settings)


def test_auto_shift_counts_each_familys_own_tokens():
    from simpletuner.config.settings import Settings
    from simpletuner.models.registry import get_family

    latents = torch.zeros(1, 4, 32, 48)
    assert get_family("flux")(Settings({})).image_seq_len(latents) == 16 * 24  # 2x2 patches
    assert get_family("sana")(Settings({})).image_seq_len(latents) == 32 * 48  # one token per latent pixel
    assert get_family("ltxvideo")(Settings({})).image_seq_len(latents) == 32 * 48


def test_fast_schedule_uses_only_its_sigmas():
    s = flow({"flux_fast_schedule": True, "flow_schedule_shift": 3.0}, n=400)
    values = {round(v, 4) for v in s.tolist()}
    assert values == {1.0, 0.75, 0.5, 0.25}


def test_timestep_bias_shapes_flow_sigmas():
    s = flow({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 3.0})
    assert abs((s >= 0.75).float().mean().item() - 0.5) < 0.02


def test_conflicting_flow_distributions_are_refused():
    with pytest.raises(ValueError, match="flow_use_uniform_schedule and flow_use_beta_schedule"):
        flow({"flow_use_uniform_schedule": True, "flow_use_beta_schedule": True})


def test_flow_mixing_and_target():
    latents, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.25, 1.0])
    mixed = noise.flow_noisy_latents(latents, eps, sigmas)
    assert torch.allclose(mixed[0], 0.75 * latents[0] + 0.25 * eps[0])
    assert torch.allclose(mixed[1], eps[1])
    assert torch.equal(noise.flow_target(latents, eps), eps - latents)
