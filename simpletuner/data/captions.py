"""Captions for each image, following the dataset's caption_strategy.

Strategies:
- ``filename``: the file name without folder and extension, underscores
  turned into spaces, and a trailing copy counter such as " (3)" or " - 2"
  removed.
- ``textfile``: the sibling ``<name>.txt``; each non-empty line is one
  candidate caption unless ``disable_multiline_split`` is set.
- ``instanceprompt``: the dataset's ``instance_prompt`` for every image.
- ``parquet``: a row of a parquet (or JSON-lines) table, matched on
  ``filename_column``; ``caption_column`` may hold a string or a list, and
  ``fallback_caption_column`` is used when it is empty. An image missing from
  the table uses its file name, with an error logged.

Then, in order: ``caption_filter_list`` edits each caption, ``caption_shuffle``
adds shuffled variants, and ``prepend_instance_prompt`` puts the instance
prompt in front. ``only_instance_prompt`` replaces everything with the
instance prompt.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from typing import Any

from simpletuner.data.dataset_config import DatasetConfigError
from simpletuner.data.dataset_spec import DatasetSpec
from simpletuner.data.storage.base import Storage

logger = logging.getLogger("simpletuner.data")

_COPY_COUNTER = re.compile(r"(\s*\(\d+\)|\s+-\s+\d+)+$")
_SED_RULE = re.compile(r"^s/((?:[^/\\]|\\.)*)/((?:[^/\\]|\\.)*)/$")
_SHUFFLE_SEPARATORS = {"comma": ",", "space": " ", "period": "."}
_SHUFFLE_JOINERS = {"comma": ", ", "space": " ", "period": ". "}


class MissingCaption(Exception):
    """The image has no usable caption; the message is the reason, for the rejection list."""


def caption_from_filename(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    text = stem.replace("_", " ")
    text = _COPY_COUNTER.sub("", text)
    return " ".join(text.split())


def split_caption_text(text: str, multiline: bool = True) -> tuple[str, ...]:
    """Caption candidates from the text of a caption file."""
    if not multiline:
        single = text.strip()
        return (single,) if single else ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


class CaptionFilter:
    """caption_filter_list: literal strings or regexes to remove, and s/search/replace/ rules.

    A line that is a valid regular expression is used as one (a plain word is
    a valid regex that matches itself); a line that is not is removed
    literally. ``s/a/b/`` replaces the first match of ``a`` with ``b``.
    """

    def __init__(self, entries: list[str]):
        self.rules: list[tuple[re.Pattern, str, int]] = []
        for entry in entries:
            if not entry.strip():
                continue
            sed = _SED_RULE.match(entry)
            if sed:
                self.rules.append((self._compile(sed.group(1)), sed.group(2).replace("\\/", "/"), 1))
            else:
                self.rules.append((self._compile(entry), "", 0))

    @staticmethod
    def _compile(pattern: str) -> re.Pattern:
        try:
            return re.compile(pattern)
        except re.error:
            return re.compile(re.escape(pattern))

    @classmethod
    def from_setting(cls, value: tuple[str, ...] | str, where: str = "caption_filter_list") -> "CaptionFilter":
        if not isinstance(value, str):
            return cls(list(value))
        try:
            return cls(_read_filter_file(value))
        except (OSError, ValueError) as exc:
            raise DatasetConfigError([f"{where}: cannot use filter file {value!r}: {exc}"]) from exc

    def apply(self, caption: str) -> str:
        for pattern, replacement, count in self.rules:
            caption = pattern.sub(lambda _match: replacement, caption, count=count)
        return " ".join(caption.split())


def _read_filter_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.lower().endswith(".json"):
        entries = json.loads(text)
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError("a JSON filter file must hold a list of strings")
        return entries
    return [line.rstrip("\r") for line in text.split("\n")]


def shuffled_variants(caption: str, options: dict, default_seed: int) -> tuple[str, ...]:
    """caption_shuffle: the caption plus deterministic reorderings of its tags."""
    mode = options.get("split_on", "comma")
    keep = int(options.get("position_start", 0))
    count = int(options.get("count", 1))
    include_original = bool(options.get("include_original", True))
    tags = [t.strip() for t in caption.split(_SHUFFLE_SEPARATORS[mode]) if t.strip()]
    if len(tags) < keep + 2:
        if not include_original:
            logger.warning("caption_shuffle: %r has too few tags to shuffle; keeping it as it is.", caption)
        return (caption,)
    rng = random.Random(f"{options.get('seed', default_seed)}/{caption}")
    variants = [caption] if include_original else []
    for _ in range(count):
        moving = tags[keep:]
        rng.shuffle(moving)
        variant = _SHUFFLE_JOINERS[mode].join(tags[:keep] + moving)
        if variant not in variants:
            variants.append(variant)
    return tuple(variants)


class ParquetCaptions:
    """Captions looked up in a parquet or JSON-lines table by file name."""

    def __init__(self, options: dict, storage: Storage, dataset_label: str):
        self.options = options
        self.with_extension = bool(options.get("identifier_includes_extension", False))
        table = _read_table(options["path"], storage, dataset_label)
        key_column = options.get("filename_column", "id")
        caption_column = options.get("caption_column", "caption")
        fallback = options.get("fallback_caption_column")
        for column in (key_column, caption_column, fallback):
            if column and column not in table.columns:
                raise DatasetConfigError([f"{dataset_label}: column {column!r} is not in {options['path']} "
                                          f"(columns: {', '.join(map(str, table.columns))}); fix the parquet block."])
        self.rows: dict[str, tuple[Any, Any]] = {}
        fallbacks = table[fallback] if fallback else [None] * len(table)
        for key, caption, spare in zip(table[key_column], table[caption_column], fallbacks):
            self.rows[str(key)] = (caption, spare)

    def lookup(self, path: str) -> tuple[str, ...] | None:
        name = os.path.basename(path)
        candidates = (path, name) if self.with_extension else (os.path.splitext(path)[0], os.path.splitext(name)[0])
        for key in candidates:
            if key in self.rows:
                primary, spare = self.rows[key]
                return _cell_captions(primary) or _cell_captions(spare)
        return None


def _cell_captions(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if v is not None and str(v).strip())
    if isinstance(value, float) and value != value:  # NaN from pandas
        return ()
    return (str(value),)


def _read_table(location: str, storage: Storage, dataset_label: str):
    """Load the table from an absolute path, the dataset's storage, or a path relative to the working folder."""
    import pandas as pd

    if os.path.isabs(location) and os.path.isfile(location):
        with open(location, "rb") as handle:
            data = handle.read()
    elif storage.exists(location):
        data = storage.read_bytes(location)
    elif os.path.isfile(location):
        with open(location, "rb") as handle:
            data = handle.read()
    else:
        raise DatasetConfigError([f"{dataset_label}: {location!r} was found neither in "
                                  f"{storage.describe(location)} nor at {os.path.abspath(location)}; "
                                  "fix parquet.path."])
    try:
        if location.lower().endswith((".jsonl", ".json")):
            return pd.read_json(io.BytesIO(data), lines=location.lower().endswith(".jsonl"))
        return pd.read_parquet(io.BytesIO(data))
    except (OSError, ValueError) as exc:
        raise DatasetConfigError([f"{dataset_label}: cannot read {location!r} as a table: {exc}"]) from exc


class CaptionSource:
    """Gives the caption candidates of each image of one dataset.

    Everything it needs is on the spec (global fallbacks are applied there);
    ``settings`` is accepted for symmetry with the other dataset builders.
    """

    def __init__(self, spec: DatasetSpec, storage: Storage, settings=None):
        self.spec = spec
        self.storage = storage
        self.filter = None
        if spec.caption_filter_list:
            self.filter = CaptionFilter.from_setting(spec.caption_filter_list, spec.where("caption_filter_list"))
        self.parquet = None
        if spec.caption_strategy == "parquet" and not spec.only_instance_prompt:
            self.parquet = ParquetCaptions(spec.parquet or {}, storage, spec.where("parquet"))

    def captions_for(self, path: str) -> tuple[str, ...]:
        """Caption candidates for an image path; raises MissingCaption when there is none."""
        spec = self.spec
        if spec.only_instance_prompt:
            return (spec.instance_prompt,)
        captions = self._raw_captions(path)
        if self.filter is not None:
            captions = tuple(self.filter.apply(c) for c in captions)
        if spec.caption_shuffle and spec.caption_shuffle.get("enable", False):
            captions = tuple(v for c in captions for v in shuffled_variants(c, spec.caption_shuffle, spec.seed))
        if spec.prepend_instance_prompt:
            captions = tuple(f"{spec.instance_prompt} {c}".strip() for c in captions)
        return _unique(captions)

    def _raw_captions(self, path: str) -> tuple[str, ...]:
        strategy = self.spec.caption_strategy
        if strategy == "instanceprompt":
            return (self.spec.instance_prompt,)
        if strategy == "textfile":
            return self._from_textfile(path)
        if strategy == "parquet":
            found = self.parquet.lookup(path)
            if found is None:
                logger.error("%s: %s is not in the parquet table; using its file name as the caption.",
                             self.spec.where(), path)
                return (caption_from_filename(path),)
            if not found:
                raise MissingCaption(f"empty caption: the parquet row for {path} has no caption")
            return found
        return (caption_from_filename(path),)

    def _from_textfile(self, path: str) -> tuple[str, ...]:
        caption_path = os.path.splitext(path)[0] + ".txt"
        try:
            data = self.storage.read_bytes(caption_path)
        except FileNotFoundError as exc:
            raise MissingCaption(f"no caption: {self.storage.describe(caption_path)} does not exist") from exc
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise MissingCaption(f"unreadable caption: {self.storage.describe(caption_path)} is not UTF-8 text") from exc
        captions = split_caption_text(text, multiline=not self.spec.disable_multiline_split)
        if not captions:
            raise MissingCaption(f"empty caption: {self.storage.describe(caption_path)} is empty")
        return captions


def _unique(captions: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(captions))
