"""Tiny DeepFloyd IF pipelines: T5 encoder and a pixel-space UNet, no VAE (stage I; stage II via build_stage_ii).

The UNet keeps what the real IF-I UNets have and the family relies on: it
reads 3 RGB channels and writes 6 (noise and learned variance), projects the
T5 states itself (``encoder_hid_dim``), pools them into the time embedding
(``addition_embed_type="text"``) and uses the simple cross-attention blocks
whose attention has the extra ``add_k_proj``/``add_v_proj`` projections. The
scheduler is DDPM with IF's squared-cosine betas and learned-range variance.
The stage II UNet also reads the upscaled low-resolution image (6 input
channels) and embeds its noise level like a timestep (``class_embed_type``).
Safety checker, feature extractor and watermarker are left out, as a model
saved without them declares (``requires_safety_checker=False``).
"""

from __future__ import annotations

from simpletuner.models.tiny.sd3 import make_t5_tokenizer, t5_encoder

T5_WIDTH = 32


def _unet(stage_ii: bool = False):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=6 if stage_ii else 3,
        class_embed_type="timestep" if stage_ii else None,  # stage II: the noise level of the upscaled input
        out_channels=6,  # noise and learned variance, as the real stage I models
        # Attention only at the lowest resolution (as the real models, which attend at 32px and below):
        # attending over every pixel of a 64px image would make this tiny model slow.
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(4, 8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        act_fn="gelu",
        attention_head_dim=4,
        cross_attention_dim=16,
        encoder_hid_dim=T5_WIDTH,
        encoder_hid_dim_type="text_proj",
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        resnet_time_scale_shift="scale_shift",
        resnet_skip_time_act=True,
        resnet_out_scale_factor=1 / 0.7071,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    # IF's own settings: cosine betas, learned-range variance, dynamic thresholding of the sample.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
        prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
        clip_sample=True, clip_sample_range=1.0,
    )


def _image_noising_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                         variance_type="fixed_small")


def _build_deepfloyd():
    from diffusers import IFPipeline

    tokenizer = make_t5_tokenizer()
    return IFPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer, T5_WIDTH),
        unet=_unet(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )


def build_stage_ii():
    """A tiny IFSuperResolutionPipeline (used with model_flavour=ii-*), not saved; call save_pretrained."""
    from diffusers import IFSuperResolutionPipeline

    tokenizer = make_t5_tokenizer()
    return IFSuperResolutionPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer, T5_WIDTH),
        unet=_unet(stage_ii=True),
        scheduler=_scheduler(),
        image_noising_scheduler=_image_noising_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )


BUILDERS = {"deepfloyd": (_build_deepfloyd, "IFPipeline")}
