"""Options that only matter for one model family (Flux, SD3, Sana, HiDream, LTX, SDXL refiner, video)."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Family-specific"

OPTIONS = [
    # Flux
    opt("flux_guidance_mode", "str", "constant",
        "How the Flux guidance vector is picked during training: one fixed value, or a random draw "
        "between flux_guidance_min and flux_guidance_max for each sample.",
        choices=("constant", "random-range"), status=BUILT),
    opt("flux_attention_masked_training", "bool", False,
        "Mask out T5 padding tokens in Flux attention while training.", status=BUILT),
    opt("flux_guidance_value", "float", 1.0,
        "Guidance vector fed to Flux in constant mode. 1.0 keeps the Dev model's distillation intact; "
        "values around 3.5-4.5 train the model back towards real classifier-free guidance.", status=BUILT),
    opt("flux_guidance_min", "float", 0.0,
        "Lowest guidance vector drawn when flux_guidance_mode is random-range.", status=BUILT),
    opt("flux_guidance_max", "float", 4.0,
        "Highest guidance vector drawn when flux_guidance_mode is random-range.", status=BUILT),
    # T5 / SD3
    opt("t5_padding", "str", "unmodified",
        "What to do with the padded positions of T5 embeddings: overwrite them with zeros, or keep them as "
        "the encoder produced them.",
        choices=("zero", "unmodified"), status=BUILT),
    opt("sd3_clip_uncond_behaviour", "str", "empty_string",
        "SD3 unconditional CLIP input: the encoded empty caption, or an all-zero embedding.",
        choices=("empty_string", "zero"), status=BUILT),
    opt("sd3_t5_uncond_behaviour", "str", None,
        "SD3 unconditional T5 input: the encoded empty caption, or zeros. Unset follows "
        "sd3_clip_uncond_behaviour.",
        choices=("empty_string", "zero"), status=BUILT),
    # Sana
    opt("sana_complex_human_instruction", "str", None,
        "Instruction text that Sana prepends to each caption before encoding it with Gemma. Unset uses the "
        "family's built-in instruction; in a config file a list of strings is joined line by line.",
        status=BUILT),
    # HiDream
    opt("hidream_use_load_balancing_loss", "bool", False,
        "Add HiDream's mixture-of-experts router load-balancing term to the loss (experimental): each expert "
        "layer's Switch-style balance term (1.0 when tokens spread evenly), summed over the layers.",
        status=BUILT),
    opt("hidream_load_balancing_loss_weight", "float", 0.01,
        "Multiplier for the HiDream load-balancing term; raise it (e.g. 0.1-0.2) for a stronger push "
        "towards even expert use.", status=BUILT),
    # LTX Video
    opt("ltx_train_mode", "str", "i2v",
        "LTX Video training objective: plain text-to-video, or image-to-video where the first frame is "
        "given as conditioning.",
        choices=("t2v", "i2v"), status=PLANNED),
    opt("ltx_i2v_prob", "float", 0.1,
        "In i2v mode, the chance (0-1) that a sample is trained with its first frame as conditioning.",
        status=PLANNED),
    opt("ltx_partial_noise_fraction", "float", 0.05,
        "How much noise (0-1) is still mixed into the conditioning first frame in LTX i2v training.",
        status=PLANNED),
    opt("ltx_protect_first_frame", "bool", False,
        "Keep the conditioning first frame completely clean of noise in LTX i2v training.", status=PLANNED),
    # Refiner / mixture-of-experts
    opt("refiner_training", "bool", False,
        "Train one stage of a two-stage (mixture-of-experts) model on only part of the timestep range.",
        status=PLANNED),
    opt("refiner_training_invert_schedule", "bool", False,
        "With refiner_training, train the high-noise part of the schedule (the base stage) instead of the "
        "low-noise refiner part.", status=PLANNED),
    opt("refiner_training_strength", "float", 0.2,
        "With refiner_training, the fraction (0-1) of the timestep schedule that the refiner stage covers.",
        status=PLANNED),
    opt("sdxl_refiner_uses_full_range", "bool", False,
        "Train the SDXL refiner on every timestep rather than only its usual low-noise end.", status=PLANNED),
    # Video
    opt("framerate", "int", None,
        "Frames per second assumed for video training samples; unset uses the model family's default.",
        status=PLANNED),
]
