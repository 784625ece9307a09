"""delete_model_after_load: the base model's files leave the Hugging Face cache once they are in memory.

For machines billed by the gigabyte of disk: the weights are in memory for the whole run, so their cached
files are only needed again by the next run, which downloads them again. What goes, and when:

- the denoiser's files (the base model's unet/ or transformer/ folder, or the repository named by
  pretrained_unet/transformer_model_name_or_path), as soon as every process has loaded the model;
- the base model's text encoder folders, once the text embeds are cached; they stay when
  fully_unload_text_encoder unloaded the encoders and something later loads them again (validation,
  eval datasets, a full model's save);
- the base model's VAE folder at the same time, unless validation is enabled (validation_disable off).

Only the Hugging Face hub cache is touched: a local folder or single-file checkpoint given as a path is
never deleted, nor are tokenizers, scheduler configs, separately named VAE / T5 / Gemma repositories (often
shared between models), or anything the run writes (checkpoints, outputs). A component's files are its
subfolder of the snapshot this run read (``revision``, else main); a blob another snapshot still links is
kept. One process per machine deletes (the local main process), after every process has loaded; a file
that is already gone (another machine sharing the cache removed it) or cannot be removed is skipped with a
log line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("simpletuner.model_file_cleanup")


@dataclass(frozen=True)
class ComponentFiles:
    """Where one loaded component's files sit in a hub repository."""

    label: str  # what the log calls it: "denoiser", "VAE", "text encoder"
    repo_id: str  # a hub id (a local path holds nothing to delete)
    subfolder: str | None  # None: the repository's top level
    revision: str | None = None  # branch, tag or commit; None is main


# --- what each step deletes ----------------------------------------------------------------------------
def denoiser_files(family, settings) -> list[ComponentFiles]:
    kind = family.denoiser_subfolder  # "unet" or "transformer"
    subfolder = getattr(settings, f"pretrained_{kind}_subfolder", None) or kind
    subfolder = None if subfolder == "none" else subfolder
    custom = getattr(settings, f"pretrained_{kind}_model_name_or_path", None)
    if custom:
        return [ComponentFiles("denoiser", custom, subfolder)]
    return [ComponentFiles("denoiser", family.model_path(settings), subfolder, settings.revision)]


def text_encoder_files(family, settings) -> list[ComponentFiles]:
    base = family.model_path(settings)
    return [ComponentFiles("text encoder", base, attribute, settings.revision)
            for attribute in family.text_encoder_attributes]


def vae_files(family, settings) -> list[ComponentFiles]:
    if settings.pretrained_vae_model_name_or_path or family.vae_class_name is None:  # None: pixel space, no VAE
        return []
    return [ComponentFiles("VAE", family.model_path(settings), "vae", settings.revision)]


# --- trainer hooks ---------------------------------------------------------------------------------------
def delete_denoiser_files(trainer) -> None:
    """The setup_model hook: the denoiser is loaded on every process, so its files can go."""
    if trainer.settings.delete_model_after_load:
        _delete_on_each_machine(trainer, denoiser_files(trainer.family, trainer.settings))


def delete_encoder_files(trainer) -> None:
    """The setup_data hook (caches built): the text encoders' and, without validation, the VAE's files go."""
    settings = trainer.settings
    if not settings.delete_model_after_load:
        return
    from simpletuner.training.unloading import text_encoders_needed_later

    parts = []
    if settings.fully_unload_text_encoder and text_encoders_needed_later(settings, trainer.data):
        logger.info("delete_model_after_load: keeping the text encoders' files, which fully_unload_text_encoder "
                    "loads again for validation or saving")
    else:
        parts += text_encoder_files(trainer.family, settings)
    if settings.validation_disable:
        parts += vae_files(trainer.family, settings)
    else:
        logger.info("delete_model_after_load: keeping the VAE's files while validation is enabled")
    _delete_on_each_machine(trainer, parts)


def _delete_on_each_machine(trainer, parts: list[ComponentFiles]) -> None:
    trainer.accelerator.wait_for_everyone()  # no process may still be reading the files
    if not trainer.accelerator.is_local_main_process:
        return
    for part in parts:
        freed = delete_component_files(part)
        where = f"{part.subfolder + '/' if part.subfolder else ''} of {part.repo_id}"
        if freed is None:
            logger.info("delete_model_after_load: the %s (%s) is not in the Hugging Face cache; nothing removed",
                        part.label, where)
        else:
            logger.info("delete_model_after_load: removed the %s's files (%s, %.1f MB) from the Hugging Face "
                        "cache", part.label, where, freed / 2**20)


# --- the hub cache ---------------------------------------------------------------------------------------
def snapshot_folder(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision`` (a branch or tag through refs/, or a commit), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if not repo_id or os.path.exists(repo_id) or repo_id.count("/") > 1:
        return None  # a local path, never a hub id
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    reference = repo / "refs" / (revision or "main")
    commit = reference.read_text(encoding="utf-8").strip() if reference.is_file() else (revision or "main")
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def delete_component_files(part: ComponentFiles) -> int | None:
    """Remove a component's files from the cache; bytes freed, or None when the cache holds none of them."""
    snapshot = snapshot_folder(part.repo_id, part.revision)
    folder = snapshot / part.subfolder if snapshot is not None and part.subfolder else snapshot
    if folder is None or not folder.is_dir():
        return None
    entries = [path for path in folder.rglob("*") if path.is_symlink() or path.is_file()]
    blobs = {path.resolve() for path in entries if path.is_symlink()}
    freed = sum(_remove(path) for path in entries)
    snapshots = snapshot.parent
    still_linked = {path.resolve() for path in snapshots.rglob("*") if path.is_symlink()}
    freed += sum(_remove(blob) for blob in blobs - still_linked)
    _remove_empty_folders(folder)
    return freed


def _remove(path: Path) -> int:
    """Delete one file or link; the bytes it held (0 for a link), or 0 when it could not be removed."""
    try:
        size = 0 if path.is_symlink() else path.stat().st_size
        path.unlink()
        return size
    except OSError as error:  # removed meanwhile by another machine sharing the cache, or not ours to remove
        logger.info("delete_model_after_load: skipped %s (%s)", path, error)
        return 0


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _remove_folder_if_empty(path)
    _remove_folder_if_empty(folder)


def _remove_folder_if_empty(folder: Path) -> None:
    try:
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError:  # not empty after all, or already gone
        pass
