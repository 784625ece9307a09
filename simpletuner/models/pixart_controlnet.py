"""A ControlNet for PixArt Sigma (diffusers has none): a trainable copy of the transformer's first blocks.

``PixArtControlNetModel`` copies the PixArt transformer's patch embedding,
timestep and caption embedders and its first ``num_layers`` blocks. The
control image's VAE latents enter through a zero-initialised patch
projection added to the embedded noisy latents, and after each copied block
a zero-initialised linear layer emits one residual. The base transformer
adds residual ``k`` to its hidden states right after its own block ``k``
(``block_residuals_added``). Both ends start at zero, so a new ControlNet
leaves the base model's output exactly as it was.

The model is a diffusers ``ModelMixin``/``ConfigMixin``: ``save_pretrained``
and ``from_pretrained`` work as for diffusers' own ControlNets. Rendering:
``simpletuner.models.pixart_controlnet_pipeline.PixArtSigmaControlNetPipeline``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from diffusers.utils import BaseOutput

# Transformer config values the ControlNet's copied layers are built with (all but the block count).
COPIED_CONFIG = (
    "num_attention_heads", "attention_head_dim", "in_channels", "dropout", "cross_attention_dim", "attention_bias",
    "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm", "upcast_attention",
    "norm_elementwise_affine", "norm_eps", "interpolation_scale", "caption_channels", "attention_type",
)
# Transformer layers copied besides the blocks: patch embedding, timestep embedder, caption projection.
COPIED_EMBEDDINGS = ("pos_embed.", "adaln_single.", "caption_projection.")
OWN_MODULES = ("controlnet_cond_embedding", "controlnet_blocks")  # zero-initialised; no transformer counterpart


def default_layer_count(transformer_layers: int) -> int:
    """Half the transformer's blocks (14 of PixArt Sigma's 28), at least one."""
    return max(1, transformer_layers // 2)


def attention_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A (B, L) keep/discard mask as the additive (B, 1, L) bias the transformer blocks expect."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


@dataclass
class PixArtControlNetOutput(BaseOutput):
    controlnet_block_samples: tuple[torch.Tensor, ...]


class PixArtControlNetModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "adaln_single"]  # as PixArtTransformer2DModel

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        num_layers: int = 14,
        dropout: float = 0.0,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        use_additional_conditions: bool = False,
        caption_channels: int | None = 4096,
        attention_type: str | None = "default",
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels,
            embed_dim=inner_dim, interpolation_scale=interpolation_scale or max(sample_size // 64, 1),
        )
        self.adaln_single = AdaLayerNormSingle(inner_dim, use_additional_conditions=use_additional_conditions)
        self.caption_projection = None
        if caption_channels is not None:
            self.caption_projection = PixArtAlphaTextProjection(in_features=caption_channels, hidden_size=inner_dim)
        self.transformer_blocks = torch.nn.ModuleList([
            BasicTransformerBlock(
                inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=attention_bias,
                upcast_attention=upcast_attention, norm_type="ada_norm_single",
                norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps, attention_type=attention_type,
            )
            for _ in range(num_layers)
        ])
        # The control latents, cut into the same patches as the noisy latents.
        self.controlnet_cond_embedding = torch.nn.Conv2d(in_channels, inner_dim, kernel_size=patch_size,
                                                         stride=patch_size)
        self.controlnet_blocks = torch.nn.ModuleList([torch.nn.Linear(inner_dim, inner_dim)
                                                      for _ in range(num_layers)])
        self.zero_own_layers()
        self.gradient_checkpointing = False

    def zero_own_layers(self) -> None:
        """Zero the control embedding and output projections (a new ControlNet changes nothing)."""
        for module in (self.controlnet_cond_embedding, *self.controlnet_blocks):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)

    @classmethod
    def from_transformer(cls, transformer, num_layers: int | None = None) -> "PixArtControlNetModel":
        """A new ControlNet holding copies of ``transformer``'s embeddings and first ``num_layers`` blocks."""
        config = transformer.config
        layers = default_layer_count(config.num_layers) if num_layers is None else int(num_layers)
        if not 1 <= layers <= config.num_layers:
            raise ValueError(f"num_layers={layers}: a PixArt ControlNet copies between 1 and {config.num_layers} "
                             "transformer blocks")
        controlnet = cls(**{key: config[key] for key in COPIED_CONFIG}, num_layers=layers,
                         use_additional_conditions=bool(transformer.use_additional_conditions))
        copied = {name: tensor for name, tensor in transformer.state_dict().items() if _is_copied(name, layers)}
        missing, unexpected = controlnet.load_state_dict(copied, strict=False)
        not_own = [name for name in missing if not name.startswith(OWN_MODULES)]
        if not_own or unexpected:
            raise ValueError(f"the PixArt transformer's layers do not fit the ControlNet: missing {not_own[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return controlnet

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        added_cond_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> PixArtControlNetOutput | tuple:
        """One residual per copied block, for the PixArt transformer's hidden states (B, tokens, width)."""
        batch = hidden_states.shape[0]
        hidden = self.pos_embed(hidden_states)
        control = self.controlnet_cond_embedding(controlnet_cond.to(hidden.dtype))
        hidden = hidden + control.flatten(2).transpose(1, 2)
        timestep, _ = self.adaln_single(timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=hidden.dtype)
        if self.caption_projection is not None:
            encoder_hidden_states = self.caption_projection(encoder_hidden_states).view(batch, -1, hidden.shape[-1])
        block_inputs = (attention_bias(attention_mask, hidden.dtype), encoder_hidden_states,
                        attention_bias(encoder_attention_mask, hidden.dtype), timestep, cross_attention_kwargs, None)
        samples = []
        for block, projection in zip(self.transformer_blocks, self.controlnet_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = self._gradient_checkpointing_func(block, hidden, *block_inputs)
            else:
                hidden = block(hidden, *block_inputs)
            samples.append(projection(hidden) * conditioning_scale)
        if not return_dict:
            return (tuple(samples),)
        return PixArtControlNetOutput(controlnet_block_samples=tuple(samples))


def _is_copied(name: str, layers: int) -> bool:
    if name.startswith(COPIED_EMBEDDINGS):
        return True
    parts = name.split(".")
    return parts[0] == "transformer_blocks" and int(parts[1]) < layers


def controlnet_residuals(controlnet: PixArtControlNetModel, control: torch.Tensor, args: tuple, kwargs: dict,
                         scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """The ControlNet's residuals for one PixArt transformer call (its positional and keyword arguments)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    dtype = controlnet.dtype
    text = kwargs["encoder_hidden_states"]
    samples = controlnet(
        hidden.to(dtype), encoder_hidden_states=text.to(dtype), timestep=kwargs["timestep"],
        controlnet_cond=control.to(dtype), conditioning_scale=scale, added_cond_kwargs=kwargs.get("added_cond_kwargs"),
        encoder_attention_mask=kwargs.get("encoder_attention_mask"), attention_mask=kwargs.get("attention_mask"),
        cross_attention_kwargs=kwargs.get("cross_attention_kwargs"), return_dict=False,
    )[0]
    return tuple(sample.to(hidden.dtype) for sample in samples)


@contextmanager
def block_residuals_added(transformer: torch.nn.Module, residuals: Sequence[torch.Tensor]) -> Iterator[None]:
    """While open, the transformer adds ``residuals[k]`` to its hidden states after its block ``k``.

    PixArtTransformer2DModel's forward takes no ControlNet outputs, so they are
    added by forward hooks on its blocks (which also run inside gradient checkpointing).
    """
    blocks = transformer.transformer_blocks
    if len(residuals) > len(blocks):
        raise ValueError(f"the ControlNet gives {len(residuals)} residuals, but the transformer has only "
                         f"{len(blocks)} blocks")
    handles = [blocks[index].register_forward_hook(_adder(residual)) for index, residual in enumerate(residuals)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adder(residual: torch.Tensor):
    def add(module, inputs, output):
        return output + residual.to(output.dtype)

    return add
