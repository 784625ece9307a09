"""Tiny SD 1.x, SD 2.x and SDXL pipelines."""

from __future__ import annotations

from simpletuner.models.tiny.components import clip_text_encoder, vae
from simpletuner.models.tiny.tokenizer import make_tokenizer


def _sd_unet(cross_attention_dim: int, linear_projection: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        use_linear_projection=linear_projection,
    )


def sdxl_unet(cross_attention_dim: int, pooled_dim: int, **extra):
    """The tiny SDXL UNet; ``extra`` adds UNet2DConditionModel arguments (Kolors projects its text first)."""
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding + six size numbers, each given a sinusoidal embedding
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
        **extra,
    )


_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


# --------------------------------------------------------------------------- pipelines

def _build_sd1x():
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer()
    scheduler = PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae(0.18215),
        text_encoder=clip_text_encoder(tokenizer, 32, "quick_gelu", with_projection=False),
        tokenizer=tokenizer,
        unet=_sd_unet(cross_attention_dim=32, linear_projection=False),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd2x():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer(pad_token="!")  # OpenCLIP pads with "!" (id 0 in the real vocab)
    scheduler = DDIMScheduler(
        **_SD_BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae(0.18215),
        text_encoder=clip_text_encoder(tokenizer, 48, "gelu", with_projection=False),
        tokenizer=tokenizer,
        unet=_sd_unet(cross_attention_dim=48, linear_projection=True),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = make_tokenizer()
    tokenizer_2 = make_tokenizer(pad_token="!")
    text_encoder = clip_text_encoder(tokenizer, 32, "quick_gelu", with_projection=False)
    # Different widths, as in the real model (768 / 1280): single-file loading tells the encoders apart by width.
    text_encoder_2 = clip_text_encoder(tokenizer_2, 48, "gelu", with_projection=True, projection_dim=48)
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae(0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=sdxl_unet(cross_attention_dim=32 + 48, pooled_dim=48),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


# family -> (builder, pipeline class name written in model_index.json)
BUILDERS = {
    "sd1x": (_build_sd1x, "StableDiffusionPipeline"),
    "sd2x": (_build_sd2x, "StableDiffusionPipeline"),
    "sdxl": (_build_sdxl, "StableDiffusionXLPipeline"),
}
