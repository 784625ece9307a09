"""Training checkpoints: save, find, load, rotate; plus RNG capture for exact resumes.

Layout: ``output_dir/checkpoint-<step>/`` (scheduled) and
``output_dir/rolling-checkpoint-<step>/`` (rolling, kept under their own
limit). Each holds one file per state entry and ``manifest.json``,
which is written last: a folder without a manifest is an unfinished save and
is never resumed from. With ``use_tempdir`` the folder is built under a hidden
sibling name (``.checkpoint-<step>.tmp-*``) and renamed into place when
complete, so an interrupted save leaves no ``checkpoint-<step>`` behind.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import uuid
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from simpletuner.config.errors import ConfigError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_NAME = re.compile(r"^(rolling-)?checkpoint-(\d+)$")
_HIDDEN_WORK = re.compile(r"^\.(rolling-)?checkpoint-\d+\.(tmp|old)-")


def checkpoint_name(step: int, rolling: bool = False) -> str:
    return f"{'rolling-' if rolling else ''}checkpoint-{int(step)}"


# --- saving --------------------------------------------------------------------------------

def save_checkpoint(output_dir: str, step: int, epoch: int, state: Mapping[str, Any], config_summary: Mapping,
                    use_tempdir: bool = True, rolling: bool = False, work_folder: str | None = None,
                    written: Mapping[str, dict] | None = None) -> str:
    """Write ``state`` as a checkpoint folder and return its path.

    ``state`` maps a file stem to an object: a dict of tensors becomes
    ``<stem>.safetensors``; anything else ``<stem>.pt`` via ``torch.save``
    (keep those to tensors and plain Python values: they are loaded with
    ``weights_only=True``). ``config_summary`` is stored in the manifest under
    ``config`` for ``config_differences`` on resume.

    Multi-process saves: ``work_folder`` (from ``new_work_folder``) already
    holds files other ranks wrote, listed in ``written`` (stem -> manifest
    entry, from ``write_state_files`` or ``folder_entry``); they join the manifest.
    """
    name = checkpoint_name(step, rolling)
    final = os.path.join(output_dir, name)
    os.makedirs(output_dir, exist_ok=True)
    if work_folder is not None:
        folder, use_tempdir = work_folder, True
    elif use_tempdir:
        folder = new_work_folder(output_dir, step, rolling)
    else:
        _remove_checkpoint_folder(final)
        os.makedirs(final)
        folder = final
    try:
        files = {**(written or {}), **_write_state_files(folder, state)}
        _write_manifest(folder, {
            "format_version": MANIFEST_VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "rolling": bool(rolling),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
            "config": dict(config_summary),
        })
    except BaseException:
        if use_tempdir:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if use_tempdir:
        _move_into_place(folder, final)
    return final


def new_work_folder(output_dir: str, step: int, rolling: bool = False) -> str:
    """A hidden folder in output_dir that a checkpoint is built in before it is renamed into place."""
    os.makedirs(output_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{checkpoint_name(step, rolling)}.tmp-", dir=output_dir)


def write_state_files(folder: str, state: Mapping[str, Any]) -> dict[str, dict]:
    """Write entries as ``save_checkpoint`` does (e.g. another rank's part); returns their manifest entries."""
    return _write_state_files(folder, state)


def folder_entry(folder: str, name: str) -> dict:
    """Manifest entry for a sub-folder written by other code (e.g. FSDP shards); resumes check its total size."""
    return {"file": name, "format": "folder", "bytes": _folder_bytes(os.path.join(folder, name))}


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, file)) for root, _, files in os.walk(path) for file in files)


def _write_state_files(folder: str, state: Mapping[str, Any]) -> dict[str, dict]:
    files: dict[str, dict] = {}
    for stem, value in tqdm(state.items(), desc="Saving checkpoint", unit="file", leave=False):
        if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
            raise ValueError(f"checkpoint state key {stem!r} must be a plain file stem such as 'optimizer'")
        if _is_tensor_dict(value):
            filename, kind = f"{stem}.safetensors", "safetensors"
            _save_tensors(value, os.path.join(folder, filename))
        else:
            filename, kind = f"{stem}.pt", "torch"
            with open(os.path.join(folder, filename), "wb") as handle:
                torch.save(value, handle)
                _flush_to_disk(handle)
        files[stem] = {"file": filename, "format": kind, "bytes": os.path.getsize(os.path.join(folder, filename))}
    return files


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and \
        all(isinstance(key, str) and isinstance(item, torch.Tensor) for key, item in value.items())


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    prepared: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storage:  # safetensors refuses tensors that share memory (tied weights)
            tensor = tensor.clone()
        seen_storage.add(pointer)
        prepared[key] = tensor
    save_file(prepared, path, metadata={"format": "pt"})
    with open(path, "rb+") as handle:
        _flush_to_disk(handle)


def _flush_to_disk(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _write_manifest(folder: str, manifest: dict) -> None:
    partial = os.path.join(folder, MANIFEST_NAME + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, default=str)
        _flush_to_disk(handle)
    os.replace(partial, os.path.join(folder, MANIFEST_NAME))


def _move_into_place(folder: str, final: str) -> None:
    """Rename the finished folder to its final name, replacing an older save of the same step."""
    parent, name = os.path.split(final)
    aside = None
    if os.path.exists(final):
        aside = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
    os.rename(folder, final)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_checkpoint_folder(path: str) -> None:
    """Delete a checkpoint folder, manifest first, so a partial deletion never looks complete."""
    manifest = os.path.join(path, MANIFEST_NAME)
    if os.path.exists(manifest):
        os.remove(manifest)
    if os.path.isdir(path):
        shutil.rmtree(path)


# --- finding and loading ---------------------------------------------------------------------

def list_checkpoints(output_dir: str, rolling: bool | None = None) -> list[tuple[int, str]]:
    """Complete checkpoints (those with a manifest) as (step, path), oldest first.

    ``rolling``: True for rolling ones only, False for scheduled ones only, None for both.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for entry in os.listdir(output_dir):
        match = _NAME.match(entry)
        path = os.path.join(output_dir, entry)
        if not match or not os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            continue
        is_rolling = match.group(1) is not None
        if rolling is None or rolling == is_rolling:
            # scheduled sorts after rolling at the same step, so it wins "latest"
            found.append((int(match.group(2)), not is_rolling, path))
    found.sort()
    return [(step, path) for step, _, path in found]


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint (scheduled or rolling) with the highest step, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise ConfigError("resume_from_checkpoint",
                          f"{path} has no {MANIFEST_NAME}: the save was interrupted or this is not a checkpoint "
                          "folder, so it cannot be resumed. Pick another checkpoint or delete this folder.")
    with open(manifest_path, encoding="utf-8") as handle:
        return json.load(handle)


def load_checkpoint(path: str) -> tuple[dict[str, Any], dict]:
    """(state, manifest) of a complete checkpoint; each state entry as it was given to ``save_checkpoint``."""
    manifest = read_manifest(path)
    state: dict[str, Any] = {}
    for stem, entry in manifest["files"].items():
        file_path = os.path.join(path, entry["file"])
        if entry["format"] == "folder":  # read by whoever wrote it; the state holds its path
            size = _folder_bytes(file_path) if os.path.isdir(file_path) else None
        else:
            size = os.path.getsize(file_path) if os.path.isfile(file_path) else None
        if size != entry["bytes"]:
            found = "is missing" if size is None else f"is {size} bytes"
            raise ValueError(f"Checkpoint {path} is damaged: {entry['file']} {found}, the manifest says "
                             f"{entry['bytes']} bytes. Resume from another checkpoint.")
        state[stem] = file_path if entry["format"] == "folder" else _load_file(file_path, entry["format"])
    return state, manifest


def _load_file(file_path: str, kind: str) -> Any:
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(file_path)
    try:
        return torch.load(file_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{file_path} holds objects other than tensors and plain Python values, which are not "
                         f"loaded for safety ({error}).") from error


def resolve_resume_path(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint folder to resume from, or None to start fresh.

    Unset, "" or "none" start fresh. "latest" picks the newest complete
    checkpoint in ``output_dir`` (None when there is none). Any other value is a folder path, absolute or relative to
    ``output_dir`` (e.g. "checkpoint-100"); it must exist and be complete.
    Remote URIs must be downloaded by the caller first.
    """
    value = (resume_from_checkpoint or "").strip()
    if not value or value.lower() == "none":
        return None
    if value == "latest":
        return find_latest_checkpoint(output_dir)
    if "://" in value:
        raise ConfigError("resume_from_checkpoint", f"resume_from_checkpoint={value} is a remote address; fetch "
                                                    "it to a local folder and point resume_from_checkpoint there.")
    candidates = [value] if os.path.isabs(value) else [os.path.join(output_dir, value), value]
    for candidate in candidates:
        if os.path.isdir(candidate):
            read_manifest(candidate)
            return candidate
    raise ConfigError("resume_from_checkpoint", f"resume_from_checkpoint={value}: no such folder (looked at "
                                                f"{' and '.join(candidates)}). Use 'latest' or a checkpoint folder "
                                                f"such as {os.path.join(output_dir, checkpoint_name(100))}.")


# --- rotation --------------------------------------------------------------------------------

def rotate_checkpoints(output_dir: str, total_limit: int | None, rolling_limit: int | None = None) -> list[str]:
    """Delete the oldest checkpoints beyond the limits; return the deleted paths.

    ``total_limit`` (checkpoints_total_limit) counts scheduled checkpoints and
    ``rolling_limit`` (checkpoints_rolling_total_limit) rolling ones; None or 0
    keeps all. Call after a save. Also removes hidden work folders left by
    interrupted saves. Folders without a manifest are left alone.
    """
    removed = []
    for rolling, limit in ((False, total_limit), (True, rolling_limit)):
        if not limit or limit < 0:
            continue
        existing = list_checkpoints(output_dir, rolling=rolling)
        for _, path in existing[:max(len(existing) - int(limit), 0)]:
            _remove_checkpoint_folder(path)
            removed.append(path)
    for entry in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if _HIDDEN_WORK.match(entry):
            shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)
    if removed:
        logger.info("Removed old checkpoints: %s", ", ".join(os.path.basename(p) for p in removed))
    return removed


# --- resume compatibility ----------------------------------------------------------------------

def config_differences(saved_summary: Mapping, current_summary: Mapping) -> list[str]:
    """One "key: saved X, now Y" line per key whose value differs between the two summaries.

    The caller chooses which settings go in a summary (those that change the
    shape or meaning of the saved weights). Values are compared after a JSON
    round trip, as stored in the manifest.
    """
    current = json.loads(json.dumps(dict(current_summary), default=str))
    saved = dict(saved_summary)
    keys = list(saved) + [key for key in current if key not in saved]
    return [f"{key}: saved {_shown(saved.get(key))}, now {_shown(current.get(key))}"
            for key in keys if saved.get(key) != current.get(key)]


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)


# --- random number generators ------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states, as plain values and tensors."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put the generators back as ``capture_rng_state`` found them."""
    random.setstate(_as_python_state(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    saved_cuda = state.get("cuda")
    if saved_cuda and torch.cuda.is_available():
        count = min(len(saved_cuda), torch.cuda.device_count())
        if count < len(saved_cuda):
            logger.warning("Checkpoint has RNG states for %d GPUs, this machine has %d; restoring the first %d",
                           len(saved_cuda), torch.cuda.device_count(), count)
        for index in range(count):
            torch.cuda.set_rng_state(saved_cuda[index], device=index)
    elif saved_cuda:
        logger.warning("Checkpoint has CUDA RNG states but no GPU is available; they are not restored")


def _as_python_state(value: Any) -> tuple:
    """random.setstate needs tuples; a state that went through a list-producing format is converted back."""
    version, internal, gauss = value
    return version, tuple(internal), gauss
