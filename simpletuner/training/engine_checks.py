"""Checks of the training-engine options (text-encoder training, BitFit), run before any model loads."""

from __future__ import annotations

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings


def engine_errors(settings: Settings) -> list[ConfigError]:
    return text_encoder_errors(settings) + freeze_errors(settings)


def text_encoder_errors(settings: Settings) -> list[ConfigError]:
    if not settings.train_text_encoder:
        if settings.text_encoder_lr is not None:
            return [ConfigError("text_encoder_lr", "text_encoder_lr is set but train_text_encoder is not, so no "
                                                   "text encoder would use it. Set train_text_encoder=true or "
                                                   "remove text_encoder_lr.")]
        return []
    errors = []
    if settings.model_type == "lora" and settings.lora_type != "standard":
        errors.append(ConfigError("train_text_encoder", f"train_text_encoder puts PEFT LoRA adapters on the text "
                                                        f"encoders, which lora_type={settings.lora_type} cannot "
                                                        "save alongside its network. Use lora_type=standard or "
                                                        "train_text_encoder=false."))
    if settings.model_type == "lora" and settings.lora_format == "comfyui":
        errors.append(ConfigError("lora_format", "lora_format=comfyui writes the denoiser's adapter only, so the "
                                                 "trained text encoders would be lost. Use lora_format=diffusers "
                                                 "or train_text_encoder=false."))
    if settings.controlnet:
        errors.append(ConfigError("train_text_encoder", "train_text_encoder cannot be combined with controlnet: a "
                                                        "ControlNet run trains only the ControlNet. Set "
                                                        "train_text_encoder=false."))
    if settings.optimizer_release_gradients:
        errors.append(ConfigError("optimizer_release_gradients", "optimizer_release_gradients steps the denoiser's "
                                                                 "weights during backward and does not reach the "
                                                                 "text encoders. Turn it off, or set "
                                                                 "train_text_encoder=false."))
    processes = int(settings.num_processes or 1) * int(settings.num_machines or 1)
    if processes > 1:
        errors.append(ConfigError("train_text_encoder", f"train_text_encoder runs in a single process only, but "
                                                        f"{processes} processes are configured. Set "
                                                        "num_processes=1 or train_text_encoder=false."))
    if settings.text_encoder_lr is not None and float(settings.text_encoder_lr) < 0:
        errors.append(ConfigError("text_encoder_lr", f"text_encoder_lr={settings.text_encoder_lr} must not be "
                                                     "negative; unset it to use learning_rate."))
    if settings.text_encoder_limit is not None and float(settings.text_encoder_limit) < 0:
        errors.append(ConfigError("text_encoder_limit", f"text_encoder_limit={settings.text_encoder_limit} is a "
                                                        "percentage of the run and must be 0 or more (100 trains "
                                                        "the text encoders to the end)."))
    return errors


def freeze_errors(settings: Settings) -> list[ConfigError]:
    errors = []
    if settings.layer_freeze_strategy == "bitfit" and settings.model_type != "full":
        errors.append(ConfigError("layer_freeze_strategy", "layer_freeze_strategy=bitfit trains only the bias "
                                                           "terms of a full fine-tune; a LoRA has no biases to "
                                                           "train. Set model_type=full or layer_freeze_strategy="
                                                           "none."))
    if settings.train_text_encoder and settings.freeze_encoder_strategy == "between":
        before, after = int(settings.freeze_encoder_before), int(settings.freeze_encoder_after)
        if before > after:
            errors.append(ConfigError("freeze_encoder_before", f"freeze_encoder_strategy=between trains the layers "
                                                               f"from freeze_encoder_before to freeze_encoder_after, "
                                                               f"but {before} > {after} leaves none. Swap the two "
                                                               "values."))
    return errors
