"""Hardware and package requirements that some option values need.

Each requirement has a key (used in the option table's ``gated_choices``), a
sentence naming what is needed, and a check. Checks import lazily so that
parsing the config stays fast.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_capability(major: int, minor: int) -> Callable[[], bool]:
    def check() -> bool:
        import torch

        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (major, minor)

    return check


def _has(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


def _all(*checks: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: all(check() for check in checks)


def _mps() -> bool:
    import torch

    return torch.backends.mps.is_available()


def _xpu() -> bool:
    import torch

    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _any(*checks: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: any(check() for check in checks)


def local_device_type() -> str:
    """The accelerator type a run here trains on: cuda, xpu, mps, or cpu."""
    for device_type, available in (("cuda", _cuda), ("xpu", _xpu), ("mps", _mps)):
        if available():
            return device_type
    return "cpu"


def _bitsandbytes_runs_here() -> bool:
    """bitsandbytes is installed and supports this machine's device. Versions before the multi-backend
    release (0.46) carry no ``supported_torch_devices`` and run on CUDA only."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    import bitsandbytes

    return local_device_type() in getattr(bitsandbytes, "supported_torch_devices", {"cuda"})


@dataclass(frozen=True)
class Requirement:
    needs: str
    check: Callable[[], bool]


REQUIREMENTS: dict[str, Requirement] = {
    "cuda": Requirement("an NVIDIA GPU with CUDA", _cuda),
    "cuda_fp8": Requirement("an NVIDIA GPU with FP8 support (compute capability 8.9 or newer, e.g. Ada or Hopper)", _cuda_capability(8, 9)),
    "cuda_hopper": Requirement("an NVIDIA Hopper GPU (compute capability 9.0, e.g. H100)", _cuda_capability(9, 0)),
    "bitsandbytes": Requirement("the bitsandbytes package in a version that runs on this machine's device "
                                "(0.46 or newer runs on CPU, CUDA, XPU and MPS; older versions only on CUDA)",
                                _bitsandbytes_runs_here),
    "bitsandbytes_loader": Requirement("an NVIDIA (CUDA), Intel (XPU) or Apple (MPS) GPU, which diffusers' "
                                       "bitsandbytes loader insists on, and the bitsandbytes package",
                                       _all(_any(_cuda, _xpu, _mps), _bitsandbytes_runs_here)),
    "xformers": Requirement("an NVIDIA GPU with CUDA and the xformers package", _all(_cuda, _has("xformers"))),
    "flash_attn": Requirement("an NVIDIA GPU with CUDA and the flash-attn package", _all(_cuda, _has("flash_attn"))),
    "flash_attn_3": Requirement("an NVIDIA Hopper GPU and the flash-attn 3 package (flash_attn_interface)", _all(_cuda_capability(9, 0), _has("flash_attn_interface"))),
    "sageattention": Requirement("an NVIDIA GPU with CUDA and the sageattention package", _all(_cuda, _has("sageattention"))),
    "npu": Requirement("an Ascend NPU with the torch_npu package", _has("torch_npu")),
    "xla": Requirement("a TPU/XLA device with the torch_xla package", _has("torch_xla")),
    "mps": Requirement("an Apple Silicon GPU (MPS)", _mps),
    "ramtorch": Requirement("an NVIDIA GPU with CUDA and the ramtorch package", _all(_cuda, _has("ramtorch"))),
    "deepspeed": Requirement("the deepspeed package and an NVIDIA GPU", _all(_cuda, _has("deepspeed"))),
}


def unmet(requirement_key: str) -> str | None:
    """None when the requirement is met here, otherwise the sentence naming what is needed."""
    requirement = REQUIREMENTS[requirement_key]
    return None if requirement.check() else requirement.needs
