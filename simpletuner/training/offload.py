"""Offloading: keeping weights off the accelerator until they are needed.

- enable_group_offload: the denoiser's frozen weights are stored in CPU memory (or a disk
  folder) and come to the accelerator group by group while that group runs: whole blocks
  (``block_level``, the items of the denoiser's block lists, group_offload_blocks_per_group
  at a time; the layers outside the lists stay resident) or single layers (``leaf_level``).
- musubi_blocks_to_swap: the last N transformer blocks are kept on musubi_block_swap_device
  and brought in around each block's forward.
- enable_model_cpu_offload: the text encoders live on the CPU and visit the accelerator only
  while they encode (the trainer already parks the VAE once latents are cached).
- offload_during_startup: the text encoders leave the accelerator whenever the VAE runs, so
  latent caching never holds both.

Only weights that exist when the step runs are moved; the LoRA the trainer attaches
afterwards stays on the accelerator. See weight_streaming.py for why backward stays correct.
"""

from __future__ import annotations

import os

import torch
from accelerate.hooks import ModelHook

from simpletuner.config import hardware
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training.quantization import denoiser_trains_fully
from simpletuner.training.weight_streaming import (
    DiskStore,
    MemoryStore,
    Prefetcher,
    StreamedGroup,
    attach_group_hooks,
    release_all_after,
)

# Attributes that hold a diffusers transformer's block lists; their blocks are taken in the model's own
# registration order, which is the order they run.
TRANSFORMER_BLOCK_LISTS = (
    "transformer_blocks", "double_stream_blocks", "joint_transformer_blocks", "blocks", "layers",
    "single_transformer_blocks", "single_stream_blocks",
)
# lora_init_type values that read or rewrite base weights while the LoRA is attached, after offloading moved them
_INITS_READING_BASE = ("pissa", "olora", "loftq")


def apply_offloading(family, components, settings: Settings, device) -> None:
    """Setup step: group offloading or block swap on the denoiser, and text-encoder offloading."""
    device = torch.device(device)
    if settings.enable_group_offload:
        check_group_offload(settings, device)
        offload_groups(components.denoiser, settings, device)
    if settings.musubi_blocks_to_swap:
        check_block_swap(settings, device)
        swap_blocks(components.denoiser, int(settings.musubi_blocks_to_swap),
                    torch.device(settings.musubi_block_swap_device), device)
    if settings.enable_model_cpu_offload or settings.offload_during_startup:
        check_text_encoder_offload(settings)
        offload_text_encoders(components, device, after_each_use=bool(settings.enable_model_cpu_offload))


# --- checks ------------------------------------------------------------------------------
def _check_streamable(option: str, settings: Settings) -> None:
    """Rules shared by group offload and block swap: only frozen weights can be streamed."""
    if denoiser_trains_fully(settings):
        raise ConfigError(option, f"{option} streams frozen weights, but model_type=full trains all of them "
                                  "and the optimizer needs them in place. Use model_type=lora or turn "
                                  f"{option} off.")
    init_type = settings.lora_init_type or "default"
    if init_type in _INITS_READING_BASE:
        raise ConfigError("lora_init_type", f"lora_init_type={init_type} reads the base weights while the LoRA "
                                            f"is attached, after {option} has moved them. Use lora_init_type="
                                            "default or gaussian.")


def check_group_offload(settings: Settings, device: torch.device) -> None:
    _check_streamable("enable_group_offload", settings)
    if settings.musubi_blocks_to_swap:
        raise ConfigError("musubi_blocks_to_swap", "musubi_blocks_to_swap and enable_group_offload both move the "
                                                   "denoiser's blocks; use one of them.")
    if int(settings.group_offload_blocks_per_group or 0) < 1:
        raise ConfigError("group_offload_blocks_per_group", "group_offload_blocks_per_group must be 1 or more "
                                                            f"(got {settings.group_offload_blocks_per_group}).")
    if settings.group_offload_use_stream and device.type != "cuda":
        needs = hardware.REQUIREMENTS["cuda"].needs
        raise ConfigError("group_offload_use_stream", f"group_offload_use_stream needs {needs}; this run computes "
                                                      f"on {device.type}. Set it to false.")
    on_disk = bool(settings.group_offload_to_disk_path)
    if on_disk and (settings.base_model_precision or "no_change") != "no_change":
        raise ConfigError("group_offload_to_disk_path", "group_offload_to_disk_path cannot hold quantised weights "
                                                        f"(base_model_precision={settings.base_model_precision}): "
                                                        "safetensors files store plain tensors only. Drop one of them.")
    if settings.use_dora and (on_disk or settings.group_offload_type == "leaf_level"):
        raise ConfigError("use_dora", "use_dora reads each base weight outside the layer's own call, which leaf_level "
                                      "and disk group offloading do not allow. Use group_offload_type=block_level "
                                      "in memory, or turn use_dora off.")


def check_block_swap(settings: Settings, device: torch.device) -> None:
    _check_streamable("musubi_blocks_to_swap", settings)
    if int(settings.musubi_blocks_to_swap) < 0:
        raise ConfigError("musubi_blocks_to_swap", f"musubi_blocks_to_swap must be 0 (off) or more, not "
                                                   f"{settings.musubi_blocks_to_swap}.")
    text = str(settings.musubi_block_swap_device)
    try:
        swap_device = torch.device(text)
    except RuntimeError:
        raise ConfigError("musubi_block_swap_device", f"musubi_block_swap_device={text!r} is not a device name; use "
                                                      "cpu or cuda:N.") from None
    if swap_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("musubi_block_swap_device", f"musubi_block_swap_device={text} needs "
                                                      f"{hardware.REQUIREMENTS['cuda'].needs}; use cpu.")


def check_text_encoder_offload(settings: Settings) -> None:
    option = "enable_model_cpu_offload" if settings.enable_model_cpu_offload else "offload_during_startup"
    if settings.train_text_encoder:
        raise ConfigError(option, f"{option} moves the text encoders between calls, which would pull weights out "
                                  "from under their backward pass while train_text_encoder=true trains them. "
                                  "Turn one of them off.")


# --- group offloading ----------------------------------------------------------------------
def offload_groups(denoiser: torch.nn.Module, settings: Settings, device: torch.device) -> list[StreamedGroup]:
    if settings.group_offload_type == "leaf_level":
        module_groups = [[leaf] for leaf in _leaves_with_tensors(denoiser)]
    else:
        module_groups = _block_groups(denoiser, int(settings.group_offload_blocks_per_group))
    use_stream = bool(settings.group_offload_use_stream)
    folder = settings.group_offload_to_disk_path
    if folder:
        folder = os.path.join(folder, f"rank{os.environ.get('LOCAL_RANK', '0')}")
    groups = []
    for index, modules in enumerate(module_groups):
        store = DiskStore(folder, f"group_{index:05d}") if folder else MemoryStore(torch.device("cpu"), pin=use_stream)
        groups.append(StreamedGroup(modules, store, device))
    attach_group_hooks(groups, Prefetcher(device) if use_stream else None)
    release_all_after(denoiser, groups)
    return groups


def _block_groups(denoiser: torch.nn.Module, per_group: int) -> list[list[torch.nn.Module]]:
    block_lists = [child for child in denoiser.children() if isinstance(child, torch.nn.ModuleList)]
    if not block_lists:
        raise ConfigError("group_offload_type", f"group_offload_type=block_level found no block lists in "
                                                f"{type(denoiser).__name__}; use group_offload_type=leaf_level.")
    groups = []
    for blocks in block_lists:
        items = list(blocks)
        groups.extend(items[start:start + per_group] for start in range(0, len(items), per_group))
    return groups


def _leaves_with_tensors(root: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in root.modules()
            if not list(module.children()) and (module._parameters or module._buffers)]


# --- block swap ----------------------------------------------------------------------------
def transformer_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's transformer blocks in execution order; empty for models without block lists (UNets)."""
    blocks = []
    for name, child in denoiser.named_children():
        if name in TRANSFORMER_BLOCK_LISTS and isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
    return blocks


def swap_blocks(denoiser: torch.nn.Module, count: int, swap_device: torch.device,
                device: torch.device) -> list[StreamedGroup]:
    blocks = transformer_blocks(denoiser)
    if not blocks:
        raise ConfigError("musubi_blocks_to_swap", f"musubi_blocks_to_swap needs a transformer with a list of blocks; "
                                                   f"{type(denoiser).__name__} has none (UNet models cannot swap "
                                                   "blocks). Use enable_group_offload instead.")
    if count > len(blocks):
        raise ConfigError("musubi_blocks_to_swap", f"musubi_blocks_to_swap={count}, but {type(denoiser).__name__} has "
                                                   f"{len(blocks)} transformer blocks. Use {len(blocks)} or fewer.")
    pin = swap_device.type == "cpu" and device.type == "cuda"
    groups = [StreamedGroup([block], MemoryStore(swap_device, pin=pin), device) for block in blocks[-count:]]
    attach_group_hooks(groups, Prefetcher(device) if device.type == "cuda" else None)
    release_all_after(denoiser, groups)
    return groups


# --- text encoders -------------------------------------------------------------------------
def offload_text_encoders(components, device: torch.device, after_each_use: bool) -> None:
    """Text encoders start on the CPU and come to ``device`` when called; the VAE's use sends them back.

    With ``after_each_use`` (enable_model_cpu_offload) they also go back as soon as they finish.
    """
    from accelerate.hooks import add_hook_to_module

    encoders = list(components.text_encoders)
    for encoder in encoders:
        encoder.to("cpu")
        add_hook_to_module(encoder, VisitDevice(device, after_each_use))
    if components.vae is not None and encoders:
        add_hook_to_module(components.vae, EvictFirst(encoders))


class VisitDevice(ModelHook):
    """Moves its module and the call's tensors to ``device`` before each call."""

    def __init__(self, device: torch.device, return_after: bool):
        self.device = device
        self.return_after = return_after

    def pre_forward(self, module, *args, **kwargs):
        from accelerate.utils import send_to_device

        module.to(self.device)
        return send_to_device(args, self.device), send_to_device(kwargs, self.device)

    def post_forward(self, module, output):
        if self.return_after:
            module.to("cpu")
        return output


class EvictFirst(ModelHook):
    """Sends other modules to the CPU before its own module runs (diffusers' VAE encode/decode call it too)."""

    def __init__(self, others: list[torch.nn.Module]):
        self.others = others

    def pre_forward(self, module, *args, **kwargs):
        for other in self.others:
            other.to("cpu")
        return args, kwargs
