"""Keeping frozen weights off the compute device, and bringing them in only while their module runs.

Group offloading and block swap both use this. A ``StreamedGroup`` takes the parameters and
buffers that exist when it is built (the frozen base weights: a LoRA is attached later and
is never moved) and parks them in a store: host memory, another device, or a file on disk.
While one of the group's modules runs, device copies stand in for the stored tensors; when
it returns, the stored tensors are put back.

The copies replace the tensor objects rather than their ``.data``. Autograd saves the
tensors a forward used, so it keeps the copies it needs for backward, while an in-place
``.data`` swap would change what backward reads (diffusers' group offloading does that,
which is fine for inference and wrong for training). Under gradient checkpointing the
recomputed forward goes through the same hooks and loads the weights again.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    """One parameter or buffer entry of a module: where a stored tensor or its copy goes."""

    module: torch.nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.table)[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        getattr(self.module, self.table)[self.name] = tensor


def tensor_slots(modules: list[torch.nn.Module]) -> list[Slot]:
    """Every parameter and buffer slot under ``modules``, each once."""
    slots, seen = [], set()
    for root in modules:
        for module in root.modules():
            for table in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, table).items():
                    if tensor is not None and (id(module), table, name) not in seen:
                        seen.add((id(module), table, name))
                        slots.append(Slot(module, table, name))
    return slots


def _like_slot(slot: Slot, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` wrapped as the slot expects: a frozen Parameter for parameters, plain for buffers."""
    if slot.table == "_parameters":
        return torch.nn.Parameter(tensor, requires_grad=False)
    return tensor


class MemoryStore:
    """Stored tensors live on ``device`` (the CPU, or a second accelerator)."""

    def __init__(self, device: torch.device, pin: bool = False):
        self.device = torch.device(device)
        self.pin = pin
        self.stored: list[torch.Tensor] = []

    def park(self, slots: list[Slot]) -> None:
        self.stored = [self._parked(slot, slot.get()) for slot in slots]
        for slot, tensor in zip(slots, self.stored):
            slot.set(tensor)

    def _parked(self, slot: Slot, tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.detach().to(self.device)
        if self.pin and type(moved) is torch.Tensor and moved.device.type == "cpu":
            moved = moved.pin_memory()
        return _like_slot(slot, moved) if slot.table == "_parameters" else moved

    def heal(self, slots: list[Slot]) -> None:
        """Re-park tensors that something moved or replaced since (e.g. a ``model.to(device)``)."""
        for index, slot in enumerate(slots):
            current = slot.get()
            if current is not self.stored[index] or current.device != self.device:
                self.stored[index] = self._parked(slot, current)
                slot.set(self.stored[index])

    def restore(self, slots: list[Slot]) -> None:
        for slot, tensor in zip(slots, self.stored):
            slot.set(tensor)

    def fetch(self, device: torch.device, non_blocking: bool) -> list[torch.Tensor]:
        return [tensor.detach().to(device, non_blocking=non_blocking) for tensor in self.stored]


class DiskStore:
    """Stored tensors live in a safetensors file; the module keeps one-element placeholders of the right shape."""

    def __init__(self, folder: str, name: str):
        self.path = os.path.join(folder, f"{name}.safetensors")
        self.placeholders: list[torch.Tensor] = []

    def park(self, slots: list[Slot]) -> None:
        from safetensors.torch import save_file

        tensors = {str(index): slot.get().detach().cpu().contiguous() for index, slot in enumerate(slots)}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        handle, staging = tempfile.mkstemp(suffix=".tmp", dir=os.path.dirname(self.path) or ".")
        os.close(handle)
        try:
            save_file(tensors, staging)
            os.replace(staging, self.path)
        finally:
            if os.path.exists(staging):
                os.remove(staging)
        self.placeholders = [_like_slot(slot, _placeholder(tensors[str(i)])) for i, slot in enumerate(slots)]
        for slot, placeholder in zip(slots, self.placeholders):
            slot.set(placeholder)

    def heal(self, slots: list[Slot]) -> None:
        """Put back placeholders that something replaced or moved (a moved one would hold a full-size copy)."""
        for index, slot in enumerate(slots):
            current = slot.get()
            if current is not self.placeholders[index] or current.device.type != "cpu":
                self.placeholders[index] = _like_slot(slot, _placeholder(current))
        self.restore(slots)

    def restore(self, slots: list[Slot]) -> None:
        for slot, placeholder in zip(slots, self.placeholders):
            slot.set(placeholder)

    def fetch(self, device: torch.device, non_blocking: bool) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        loaded = load_file(self.path, device=str(device))
        return [loaded[str(index)] for index in range(len(self.placeholders))]


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor with ``tensor``'s shape and dtype on the CPU that holds a single element (stride 0)."""
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


class StreamedGroup:
    """Modules whose stored tensors move to the compute device together."""

    def __init__(self, modules: list[torch.nn.Module], store, compute_device: torch.device):
        self.modules = modules
        self.slots = tensor_slots(modules)
        self.store = store
        self.compute_device = torch.device(compute_device)
        self.loaded = False
        self.holder: torch.nn.Module | None = None  # the module whose call loaded the group releases it
        self.ready_event = None  # set when a prefetch stream is copying this group
        store.park(self.slots)

    def load(self, non_blocking: bool = False) -> None:
        if self.loaded:
            return
        self.store.heal(self.slots)
        copies = self.store.fetch(self.compute_device, non_blocking)
        for slot, copy in zip(self.slots, copies):
            slot.set(_like_slot(slot, copy))
        self.loaded = True

    def release(self) -> None:
        self.holder = None
        if not self.loaded:
            return
        self.loaded = False
        self.store.restore(self.slots)  # the stored tensors (or placeholders) take the copies' places again


class Prefetcher:
    """Copies the next group on a side CUDA stream while the current one computes."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)

    def start(self, group: StreamedGroup) -> None:
        if group.loaded:
            return
        with torch.cuda.stream(self.stream):
            group.load(non_blocking=True)
            group.ready_event = torch.cuda.Event()
            group.ready_event.record(self.stream)

    @staticmethod
    def wait(group: StreamedGroup) -> None:
        if group.ready_event is None:
            return
        compute_stream = torch.cuda.current_stream()
        compute_stream.wait_event(group.ready_event)
        for slot in group.slots:  # memory made on the side stream is used on the compute stream
            tensor = slot.get()
            if type(tensor.data) is torch.Tensor:
                tensor.data.record_stream(compute_stream)
        group.ready_event = None


def attach_group_hooks(groups: list[StreamedGroup], prefetcher: Prefetcher | None = None) -> list:
    """Forward hooks on every module of every group (submodules included), listed in execution order.

    The module whose call loads a group releases it when that call returns, except that the
    group's first modules hand this on, so a group of several blocks loads once per forward and
    is released after its last block. Submodules carry hooks too: gradient checkpointing
    recomputes single layers during backward without calling the block around them. With a
    prefetcher, loading group i starts copying group i+1. Returns the hook handles.
    """
    handles = []
    for index, group in enumerate(groups):
        following = groups[index + 1] if index + 1 < len(groups) else None
        enter = functools.partial(_enter_group, group, following, prefetcher)
        leave = functools.partial(_leave_group, group)
        for top in group.modules:
            for module in top.modules():
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


def _enter_group(group: StreamedGroup, following, prefetcher, module, args) -> None:
    if group.holder is not None:  # an outer call (or an earlier block of the group) already holds it
        return
    if prefetcher is not None:
        prefetcher.start(group)  # nothing to do when the previous group prefetched it
        prefetcher.wait(group)
        if following is not None:
            prefetcher.start(following)
    else:
        group.load()
    group.holder = module


def _leave_group(group: StreamedGroup, module, args, output) -> None:
    if group.holder is not module:
        return
    tops = group.modules
    if module in tops[:-1]:  # a block that is not the group's last: the last one releases
        group.holder = tops[-1]
        return
    group.holder = None
    group.release()


def release_all_after(root: torch.nn.Module, groups: list[StreamedGroup]):
    """After ``root`` returns, release any group a partial or out-of-order run left loaded."""

    def after(module, args, output):
        for group in groups:
            group.release()

    return root.register_forward_hook(after, always_call=True)
