"""train_text_encoder: the family's text encoders learn alongside the denoiser.

model_type=lora puts a PEFT LoRA on each text encoder's attention projections
(q_proj, k_proj, v_proj, out_proj, rank and alpha as for the denoiser);
model_type=full trains their weights. ``text_encoder_lr`` (default:
learning_rate) is their learning rate.

The text cache holds embeddings of the untrained encoders, so every training
batch is encoded again from its captions, keeping the autograd graph.

``freeze_encoder_strategy`` keeps some transformer layers of each encoder
frozen, by layer index: ``before`` freezes layers below freeze_encoder_before,
``after`` those above freeze_encoder_after, ``between`` both, so that only
the layers from freeze_encoder_before to freeze_encoder_after train.
Embeddings and final norms are not layers: a full fine-tune always trains them.
``text_encoder_limit`` stops updating the encoders once that
percentage of the run's steps is done; they keep encoding, unchanged.

Results: a LoRA run writes the encoders' adapters into the same
pytorch_lora_weights.safetensors (diffusers' ``load_lora_weights`` reads
them); a full run's pipeline folder holds the trained encoders. Checkpoints
carry the encoders' weights under "<attribute>." keys (e.g.
"text_encoder_2.encoder.layers.0...").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re

import torch

from simpletuner.config.settings import Settings
from simpletuner.training import adapters
from simpletuner.training.callbacks import Callback
from simpletuner.training.trainable import TrainableModel

logger = logging.getLogger(__name__)

TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FREEZE_STRATEGIES = ("before", "between", "after")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --- layer freezing ---------------------------------------------------------------------------
def layer_is_frozen(index: int, settings: Settings) -> bool:
    """Whether transformer layer ``index`` stays frozen under freeze_encoder_strategy."""
    strategy = settings.freeze_encoder_strategy or "after"
    before, after = int(settings.freeze_encoder_before), int(settings.freeze_encoder_after)
    if strategy == "before":
        return index < before
    if strategy == "after":
        return index > after
    if strategy == "between":
        return index < before or index > after
    raise ValueError(f"freeze_encoder_strategy={strategy!r} is not one of {', '.join(FREEZE_STRATEGIES)}")


def freeze_layers(encoder: torch.nn.Module, settings: Settings) -> int:
    """Stop gradients for the parameters of the layers the strategy freezes; returns how many it froze."""
    frozen = 0
    for name, parameter in encoder.named_parameters():
        match = _LAYER_INDEX.search(name)
        if parameter.requires_grad and match and layer_is_frozen(int(match.group(1)), settings):
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


@contextlib.contextmanager
def training_mode(modules: list[torch.nn.Module]):
    """Train mode (LoRA dropout active) for the duration; each module's previous mode afterwards."""
    previous = [module.training for module in modules]
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module, was_training in zip(modules, previous):
            module.train(was_training)


# --- the trained encoders ---------------------------------------------------------------------
class TrainedTextEncoders:
    """The family's text encoders as trained weights: attach, encode, state, stop."""

    def __init__(self, family, settings: Settings):
        self.family = family
        self.settings = settings
        self.as_lora = settings.model_type == "lora"
        self.encoders = dict(zip(family.text_encoder_attributes, family.components.text_encoders))
        self.parameters: list[torch.nn.Parameter] = []
        self.stopped = False

    def attach(self) -> None:
        lora_settings = self.settings.replace(peft_lora_target_modules=None)  # that option names denoiser layers
        for attribute, encoder in self.encoders.items():
            encoder.requires_grad_(False)
            if self.as_lora:
                adapters.attach_lora(encoder, lora_settings, list(TEXT_ENCODER_LORA_TARGETS))
            else:
                encoder.requires_grad_(True)
            encoder.eval()  # new adapter layers start in train mode; only encode() switches it on (LoRA dropout)
            frozen = freeze_layers(encoder, self.settings)
            if frozen:
                logger.info("%s: %d parameters stay frozen (freeze_encoder_strategy=%s)", attribute, frozen,
                            self.settings.freeze_encoder_strategy)
        self.parameters = [p for encoder in self.encoders.values() for p in encoder.parameters() if p.requires_grad]
        for parameter in self.parameters:
            parameter.data = parameter.data.float()  # trained weights stay float32, like the denoiser's

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The family's text embeddings for ``captions``, with gradients while the encoders train."""
        if self.stopped:
            return self.family.encode_text(captions)
        with training_mode(list(self.encoders.values())):
            return self.family.encode_text_for_training(captions)

    def stop_training(self) -> None:
        """text_encoder_limit reached: the encoders keep their current weights from now on."""
        for parameter in self.parameters:
            parameter.requires_grad_(False)
            parameter.grad = None
        self.stopped = True

    # --- weights ---
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for attribute, encoder in self.encoders.items():
            own = adapters.lora_state_dict(encoder) if self.as_lora else encoder.state_dict()
            state.update({f"{attribute}.{key}": value for key, value in own.items()})
        return state

    def split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
        """(per-encoder states, everything else) of a combined checkpoint state."""
        mine: dict[str, dict] = {attribute: {} for attribute in self.encoders}
        rest = {}
        for key, value in state.items():
            attribute, _, inner = key.partition(".")
            if attribute in mine and inner:
                mine[attribute][inner] = value
            else:
                rest[key] = value
        return mine, rest

    def load_state_dict(self, states: dict[str, dict]) -> None:
        for attribute, encoder in self.encoders.items():
            state = states.get(attribute)
            if not state:
                raise ValueError(f"The checkpoint holds no {attribute} weights: it was made without "
                                 "train_text_encoder. Resume with train_text_encoder=false, or start fresh.")
            if self.as_lora:
                adapters.load_lora_state(encoder, state)
            else:
                encoder.load_state_dict(state)

    def lora_states(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """(attribute -> PEFT state dict, attribute -> LoraConfig dict) for ``family.save_lora``."""
        states = {attribute: adapters.lora_state_dict(encoder) for attribute, encoder in self.encoders.items()}
        configs = {attribute: encoder.peft_config["default"].to_dict() for attribute, encoder in self.encoders.items()}
        return states, configs


def text_encoder_learning_rate(settings: Settings, learning_rate: float) -> float:
    """text_encoder_lr (default: learning_rate), scaled by whatever lr_scale did to learning_rate."""
    base = float(settings.learning_rate)
    scale = learning_rate / base if base else 1.0
    chosen = settings.text_encoder_lr if settings.text_encoder_lr is not None else base
    return float(chosen) * scale


# --- the TrainableModel -----------------------------------------------------------------------
class WithTextEncoders(TrainableModel):
    """Wraps the denoiser's TrainableModel (PEFT LoRA or full) and trains the text encoders too."""

    def __init__(self, inner: TrainableModel):
        super().__init__(inner.family, inner.settings)
        self.inner = inner
        self.module = inner.module
        self.checkpoint_key = inner.checkpoint_key
        self.text_encoders = TrainedTextEncoders(inner.family, inner.settings)

    def attach(self) -> None:
        _refuse_multi_process()
        self.inner.attach()
        self.text_encoders.attach()
        self.parameters = self.inner.parameters + self.text_encoders.parameters

    def param_groups(self, learning_rate: float) -> list[dict]:
        encoder_rate = text_encoder_learning_rate(self.settings, learning_rate)
        return [*self.inner.param_groups(learning_rate),
                {"params": self.text_encoders.parameters, "lr": encoder_rate}]

    def prepare_batch(self, batch):
        if batch.captions is None:
            raise ValueError("train_text_encoder needs each batch's captions, but this batch has none")
        return dataclasses.replace(batch, text=self.text_encoders.encode(batch.captions))

    def state_dict(self, module):
        return {**self.inner.state_dict(module), **self.text_encoders.state_dict()}

    def load_state_dict(self, module, state):
        encoder_states, rest = self.text_encoders.split(state)
        self.inner.load_state_dict(module, rest)
        self.text_encoders.load_state_dict(encoder_states)

    def save(self, module, folder):
        if not self.text_encoders.as_lora:
            self.inner.save(module, folder)  # the pipeline is built over the (trained) loaded encoders
            return
        states, configs = self.text_encoders.lora_states()
        metadata = {self.family.denoiser_subfolder: module.peft_config["default"].to_dict(), **configs}
        self.family.save_lora(folder, adapters.lora_state_dict(module), text_encoder_lora_states=states,
                              adapter_metadata=metadata)


def _refuse_multi_process() -> None:
    """The encoders are not wrapped for distributed training, so their gradients would not be averaged."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from simpletuner.config.errors import ConfigError

        raise ConfigError("train_text_encoder", "train_text_encoder runs in a single process only; set "
                                                "num_processes=1 or train_text_encoder=false.")


# --- text_encoder_limit -----------------------------------------------------------------------
class TextEncoderLimit(Callback):
    """Stops the text encoders' training once text_encoder_limit percent of the steps are done."""

    def __init__(self, percent: float):
        self.percent = percent

    def _check(self, trainer) -> None:
        encoders = getattr(trainer.trained, "text_encoders", None)
        if encoders is None or encoders.stopped:
            return
        done = 100.0 * trainer.state.global_step / max(trainer.total_steps, 1)
        if done > self.percent:
            encoders.stop_training()
            logger.info("Text encoders frozen at step %d (%.0f%% of the run, text_encoder_limit=%s)",
                        trainer.state.global_step, done, self.percent)

    def on_train_start(self, trainer) -> None:
        self._check(trainer)  # a resumed run past the limit starts with them frozen

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        self._check(trainer)


def text_encoder_limit_callback(settings: Settings) -> TextEncoderLimit | None:
    """CALLBACK_FACTORIES entry: active when the text encoders train."""
    if not settings.train_text_encoder or settings.text_encoder_limit is None:
        return None
    return TextEncoderLimit(float(settings.text_encoder_limit))
