"""Attention kernels for the denoiser: attention_mechanism, sageattention_usage and unet_attention_slice.

- ``diffusers`` leaves the model alone (PyTorch SDPA picks its kernel).
- ``native-*`` and ``cudnn`` pin one PyTorch SDPA kernel (``torch.nn.attention.sdpa_kernel``)
  around every attention module's call. The pin is per call, so the forward that gradient
  checkpointing recomputes during backward uses the same kernel. This works for UNets (which
  call SDPA directly) and for transformers that route through diffusers' dispatcher.
- ``flex``, ``flash-attn*``, ``sageattention*``, ``native-npu``/``native-xla`` and ``xformers``
  select a diffusers attention backend (``set_attention_backend``); all but xformers need a
  model whose attention goes through that dispatcher. A UNet takes xformers through
  ``enable_xformers_memory_efficient_attention`` instead.
- SageAttention passes no gradients to the QKV projections, so it is used for training only
  when sageattention_usage says so; ``purpose="inference"`` is for callers that generate images.
- ``sla`` is a planned choice (not built).
"""

from __future__ import annotations

import torch

from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings

DEFAULT = "diffusers"
# attention_mechanism -> torch.nn.attention.SDPBackend member
SDPA_KERNELS = {
    "native-math": "MATH",
    "native-flash": "FLASH_ATTENTION",
    "native-efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
# attention_mechanism -> diffusers AttentionBackendName value
DISPATCH_BACKENDS = {
    "flex": "flex",
    "flash-attn": "flash",
    "flash-attn-2": "flash",
    "flash-attn-3": "_flash_3",
    "flash-attn-3-varlen": "_flash_varlen_3",
    "native-npu": "_native_npu",
    "native-xla": "_native_xla",
    "xformers": "xformers",
    "sageattention": "sage",
    "sageattention-int8-fp16-triton": "_sage_qk_int8_pv_fp16_triton",
    "sageattention-int8-fp16-cuda": "_sage_qk_int8_pv_fp16_cuda",
    "sageattention-int8-fp8-cuda": "_sage_qk_int8_pv_fp8_cuda",
}
# Backends whose backward pass does not run on a CPU (checked at run time: the option table cannot know the device)
_NEEDS_CUDA_TO_TRAIN = ("flex",)


def configure_attention(family, components, settings: Settings, device) -> None:
    """Setup step: the attention kernel and slicing used while training."""
    select_attention(components.denoiser, settings, torch.device(device), purpose="training")
    if settings.unet_attention_slice:
        slice_unet_attention(components.denoiser, settings)


def select_attention(denoiser: torch.nn.Module, settings: Settings, device: torch.device,
                     purpose: str = "training") -> None:
    """Apply attention_mechanism to ``denoiser``; ``purpose`` is "training" or "inference"."""
    mechanism = settings.attention_mechanism or DEFAULT
    if mechanism == DEFAULT or not _used_for(mechanism, settings.sageattention_usage, purpose):
        return
    _check_runs_here(mechanism, device, purpose)
    if mechanism in SDPA_KERNELS:
        pin_sdpa_kernel(denoiser, mechanism)
    elif mechanism in DISPATCH_BACKENDS:
        _use_dispatch_backend(denoiser, mechanism)
    else:
        raise ConfigError("attention_mechanism", f"attention_mechanism={mechanism} is not implemented yet. Use "
                                                 f"{DEFAULT} or one of {', '.join(SDPA_KERNELS)}.")


def _used_for(mechanism: str, usage: str | None, purpose: str) -> bool:
    if not mechanism.startswith("sageattention"):
        return True
    return purpose in (usage or "inference").split("+")


def _check_runs_here(mechanism: str, device: torch.device, purpose: str) -> None:
    from simpletuner.config.options import OPTIONS

    requirement = OPTIONS["attention_mechanism"].gated_choices.get(mechanism)
    needs = hardware.unmet(requirement) if requirement else None
    if needs:
        raise ConfigError("attention_mechanism", f"attention_mechanism={mechanism} needs {needs}, which this machine "
                                                 f"does not have. Use {DEFAULT} or native-math.")
    if purpose == "training" and mechanism in _NEEDS_CUDA_TO_TRAIN and device.type != "cuda":
        raise ConfigError("attention_mechanism", f"attention_mechanism={mechanism} has no backward pass on "
                                                 f"{device.type}; training with it needs "
                                                 f"{hardware.REQUIREMENTS['cuda'].needs}. Use {DEFAULT} or "
                                                 "native-math.")


def attention_modules(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [module for module in denoiser.modules() if isinstance(module, (Attention, AttentionModuleMixin))]


class PinnedKernel:
    """Forward hooks that hold ``sdpa_kernel(backend)`` open for the duration of a module's call."""

    def __init__(self, backend):
        self.backend = backend
        self.open: dict[int, list] = {}

    def enter(self, module, args) -> None:
        from torch.nn.attention import sdpa_kernel

        context = sdpa_kernel([self.backend])
        context.__enter__()
        self.open.setdefault(id(module), []).append(context)

    def leave(self, module, args, output) -> None:
        stack = self.open.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)


def pin_sdpa_kernel(denoiser: torch.nn.Module, mechanism: str) -> PinnedKernel:
    from torch.nn.attention import SDPBackend

    modules = attention_modules(denoiser)
    if not modules:
        raise ConfigError("attention_mechanism", f"attention_mechanism={mechanism}: {type(denoiser).__name__} has no "
                                                 f"diffusers attention layers to apply it to. Use {DEFAULT}.")
    pinned = PinnedKernel(getattr(SDPBackend, SDPA_KERNELS[mechanism]))
    for module in modules:
        module.register_forward_pre_hook(pinned.enter)
        module.register_forward_hook(pinned.leave, always_call=True)
    return pinned


def uses_dispatcher(denoiser: torch.nn.Module) -> bool:
    """True when the model's attention processors route through diffusers' attention dispatcher."""
    return any(hasattr(getattr(module, "processor", None), "_attention_backend")
               for module in attention_modules(denoiser))


def _use_dispatch_backend(denoiser: torch.nn.Module, mechanism: str) -> None:
    if uses_dispatcher(denoiser):
        denoiser.set_attention_backend(DISPATCH_BACKENDS[mechanism])
    elif mechanism == "xformers" and hasattr(denoiser, "enable_xformers_memory_efficient_attention"):
        denoiser.enable_xformers_memory_efficient_attention()
    else:
        raise ConfigError("attention_mechanism", f"attention_mechanism={mechanism} works through diffusers' attention "
                                                 f"dispatcher, which {type(denoiser).__name__} does not use (it calls "
                                                 f"PyTorch SDPA directly). Use {DEFAULT} or a native-* choice.")


def slice_unet_attention(denoiser: torch.nn.Module, settings: Settings) -> None:
    """Attention in two slices per head group (diffusers' "auto"): lower peak memory, a little slower."""
    if not hasattr(denoiser, "set_attention_slice"):
        raise ConfigError("unet_attention_slice", f"unet_attention_slice applies to UNet models; "
                                                  f"{type(denoiser).__name__} has no attention slicing. Remove it.")
    if (settings.attention_mechanism or DEFAULT) != DEFAULT:
        raise ConfigError("unet_attention_slice", "unet_attention_slice replaces the attention kernel with sliced "
                                                  f"matmuls, so attention_mechanism={settings.attention_mechanism} "
                                                  "would do nothing. Use one of them.")
    denoiser.set_attention_slice("auto")
