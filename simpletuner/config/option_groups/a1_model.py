"""Which model is trained and where its parts come from: family, flavour, paths, control branches."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Model"

# The usage listing's families, plus "legacy", the prose's umbrella name for sd1x/sd2x.
MODEL_FAMILIES = (
    "kolors", "auraflow", "omnigen", "flux", "deepfloyd", "cosmos2image", "sana", "qwen_image",
    "pixart_sigma", "sdxl", "sd1x", "sd2x", "wan", "hidream", "sd3", "lumina2", "ltxvideo", "legacy",
)

OPTIONS = [
    opt("model_family", "str", None,
        "The architecture being fine-tuned. It decides which loaders, text encoders and noise schedule are used.",
        choices=MODEL_FAMILIES, required=True, status=BUILT),
    opt("model_flavour", "str", None,
        "A named variant inside the chosen family (for example a dev or schnell release); it picks the default "
        "checkpoint when pretrained_model_name_or_path is not given.", status=BUILT),
    opt("model_type", "str", "lora",
        "Train a small adapter on top of frozen weights (lora) or update every weight of the model (full).",
        choices=("full", "lora"), required=True, status=BUILT),
    opt("pretrained_model_name_or_path", "str", None,
        "Hugging Face repository id or local folder of the base model; some families also take a single "
        ".safetensors file. Unset uses the flavour's default checkpoint.", status=BUILT),
    opt("pretrained_vae_model_name_or_path", "str", None,
        "Load the VAE from this repository or folder instead of from the base model.", status=BUILT),
    opt("pretrained_transformer_model_name_or_path", "str", None,
        "Load the transformer (denoiser) from this repository or folder instead of from the base model.",
        status=BUILT),
    opt("pretrained_transformer_subfolder", "str", "transformer",
        "Folder inside the transformer source that holds its weights; 'none' means the weights sit at the top "
        "level.", status=BUILT),
    opt("pretrained_unet_model_name_or_path", "str", None,
        "Load the UNet (denoiser) from this repository or folder instead of from the base model.",
        status=BUILT),
    opt("pretrained_unet_subfolder", "str", "unet",
        "Folder inside the UNet source that holds its weights; 'none' means the weights sit at the top level.",
        status=BUILT),
    opt("pretrained_t5_model_name_or_path", "str", None,
        "Take the T5 text encoder from this repository or folder, so one local copy can be shared between "
        "base models.", status=BUILT),
    opt("pretrained_gemma_model_name_or_path", "str", None,
        "Take the Gemma text encoder (Sana, Lumina2 and similar) from this repository or folder instead of the "
        "base model.", status=BUILT),
    opt("revision", "str", None,
        "Git branch, tag or commit of the Hugging Face repository to download.", status=BUILT),
    opt("variant", "str", None,
        "Weight-file variant to load from the repository, such as fp16 or bf16.", status=BUILT),
    opt("prediction_type", "str", None,
        "What the denoiser is trained to output. Unset uses the family's own objective; changing it is only "
        "for models that were re-trained with another one.",
        choices=("epsilon", "v_prediction", "sample", "flow_matching"), status=BUILT),
    opt("custom_text_encoder_intermediary_layers", "str", None,
        "FLUX.2 only, experimental: JSON array of three text-encoder hidden-state indices to use, e.g. "
        "[10, 20, 30]. Changing it invalidates cached text embeds.", status=PLANNED),
    opt("delete_model_after_load", "bool", False,
        "Remove the base model's files from the Hugging Face cache once they are loaded, trading download "
        "time on the next run for disk space: the denoiser's files once loaded, the text encoders' and (with "
        "validation off) the VAE's once the caches are built. Local folders and saved checkpoints are never "
        "touched.", status=BUILT),
    # ControlNet / control training
    opt("controlnet", "bool", False,
        "Train a ControlNet branch (full or LoRA) that conditions the model on control images.",
        status=BUILT),
    opt("control", "bool", False,
        "Channel-wise control training: the denoiser's input layer is widened and the VAE latents of each "
        "training image's control image (its conditioning dataset) are concatenated to the noisy latents, "
        "instead of going through a separate ControlNet. Flux (LoRA or full; renders with FluxControlPipeline) "
        "and sd1x/sd2x/sdxl (full; InstructPix2Pix pipelines).", status=BUILT),
    opt("controlnet_custom_config", "str", None,
        "JSON object (or file path) overriding the ControlNet's architecture settings, e.g. "
        '{"num_layers": 12}.', status=BUILT),
    opt("controlnet_model_name_or_path", "str", None,
        "Existing ControlNet weights (repository id or folder) to start from instead of a fresh branch.",
        status=BUILT),
    opt("tread_config", "str", None,
        "TREAD token-routing settings as a JSON object or a path to one; it needs a 'routes' list of "
        "{selection_ratio, start_layer_idx, end_layer_idx} entries.", status=PLANNED),
]
