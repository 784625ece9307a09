"""The multidatabackend.json the wizard writes: one local image dataset plus a default text-embed store.

When editing, the existing file is loaded and only the keys the data section asks
about are replaced in its first image dataset; every other entry and key stays.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from simpletuner.config.errors import ConfigError

IMAGE_TYPES = ("image", None)
CAPTION_STRATEGIES = {
    "textfile": "textfile: a .txt file with the same name next to each image",
    "filename": "filename: the image's file name is its caption",
    "instanceprompt": "instanceprompt: one fixed prompt for every image",
}
TEXT_EMBEDS_ID = "text-embeds"


@dataclass
class DataAnswers:
    folder: str
    resolution: float
    caption_strategy: str
    instance_prompt: str | None
    repeats: int


def dataset_id_for(folder: str) -> str:
    name = os.path.basename(os.path.normpath(folder)) or "dataset"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "dataset"


def _caption_strategy(entry: dict[str, Any]) -> str:
    """The entry's caption strategy, spelling the instance-prompt one as multidatabackend.json does."""
    return str(entry.get("caption_strategy", "filename")).replace("instance_prompt", "instanceprompt")


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class DatasetFile:
    def __init__(self, entries: list[dict[str, Any]] | None = None, path: str | None = None):
        self.path = path  # where it was read from (None for a new file)
        self.entries: list[dict[str, Any]] = entries or []
        self._original = copy.deepcopy(self.entries)

    @classmethod
    def load(cls, path: str) -> "DatasetFile":
        try:
            with open(path, encoding="utf-8") as handle:
                entries = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError("data_backend_config", f"Could not read the dataset file {path}: {exc}. Fix or remove "
                                                     "it, or point data_backend_config at another file.") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigError("data_backend_config", f"The dataset file {path} must hold a JSON list of dataset "
                                                     "objects; fix it or point data_backend_config at another file.")
        return cls(entries, path)

    @property
    def changed(self) -> bool:
        return self.entries != self._original

    def image_entry(self) -> dict[str, Any] | None:
        for entry in self.entries:
            if entry.get("dataset_type") in IMAGE_TYPES:
                return entry
        return None

    def resolution_type(self) -> str:
        entry = self.image_entry()
        return str((entry or {}).get("resolution_type", "pixel_area"))

    def current(self) -> DataAnswers | None:
        entry = self.image_entry()
        if entry is None:
            return None
        return DataAnswers(
            folder=str(entry.get("instance_data_dir", "")),
            resolution=entry.get("resolution", 1024),
            caption_strategy=_caption_strategy(entry),
            instance_prompt=entry.get("instance_prompt"),
            repeats=int(entry.get("repeats", 0)),
        )

    def apply(self, answers: DataAnswers, family: str) -> None:
        """Put ``answers`` into the image dataset (created if missing) and make sure a default text store exists.

        Keys of an existing entry are touched only when their value really changes.
        """
        entry = self.image_entry()
        fresh = entry is None
        if entry is None:
            dataset_id = dataset_id_for(answers.folder)
            entry = {"id": dataset_id, "type": "local", "cache_dir_vae": f"cache/vae/{family}/{dataset_id}"}
            self.entries.insert(0, entry)
        before = self.current() if not fresh else None
        if fresh or before.folder != answers.folder:
            entry["instance_data_dir"] = answers.folder
        if fresh or before.caption_strategy != answers.caption_strategy:
            entry["caption_strategy"] = answers.caption_strategy
        new_prompt = fresh or before.instance_prompt != answers.instance_prompt
        if answers.caption_strategy == "instanceprompt" and new_prompt:
            entry["instance_prompt"] = answers.instance_prompt or ""
        if fresh or before.resolution != answers.resolution:
            entry["resolution"] = _number(float(answers.resolution))
            entry.setdefault("resolution_type", "pixel_area")
        if fresh or before.repeats != answers.repeats:
            entry["repeats"] = answers.repeats
        if not any(e.get("dataset_type") == "text_embeds" for e in self.entries):
            self.entries.append({"id": TEXT_EMBEDS_ID, "type": "local", "dataset_type": "text_embeds",
                                 "default": True, "cache_dir": f"cache/text/{family}"})

    def text(self) -> str:
        return json.dumps(self.entries, indent=4) + "\n"
