"""The text shown before anything is written."""

from __future__ import annotations

import json
from typing import Any

from simpletuner.wizard.session import Session


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _dataset_lines(session: Session) -> list[str]:
    lines = []
    for entry in session.datasets.entries:
        kind = entry.get("dataset_type", "image")
        if kind == "text_embeds":
            lines.append(f"    text embeds {entry.get('id')!r}: cache in {entry.get('cache_dir', '(default)')}")
            continue
        details = ", ".join(f"{key}={_show(entry[key])}" for key in
                            ("instance_data_dir", "resolution", "caption_strategy", "instance_prompt", "repeats",
                             "cache_dir_vae") if key in entry)
        lines.append(f"    {kind} dataset {entry.get('id')!r}: {details}")
    return lines


def new_config_summary(session: Session) -> str:
    lines = ["", "Summary", f"  {session.config_path}"]
    lines += [f"    {key}: {_show(value)}" for key, value in session.draft.output().items()]
    lines += [f"  {session.dataset_path}"] + _dataset_lines(session)
    lines += [f"  {path} (LyCORIS adapter config)" for path in session.extra_files]
    lines += _not_written_lines(session)
    return "\n".join(lines)


def changes_summary(session: Session) -> str:
    lines = ["", f"Changes to {session.config_path}"]
    changes = session.draft.changed()
    lines += [f"    {name}: {_show(before)} -> {_show(after)}" for name, before, after in changes]
    if not changes:
        lines.append("    (none)")
    if session.datasets.changed:
        lines += [f"  {session.dataset_path} (updated)"] + _dataset_lines(session)
    lines += [f"  {path} (new LyCORIS adapter config)" for path in session.extra_files]
    lines += _not_written_lines(session)
    return "\n".join(lines)


def _not_written_lines(session: Session) -> list[str]:
    dropped = session.draft.not_written()
    if not dropped:
        return []
    names = ", ".join(f"{name}={_show(value)}" for name, value in dropped)
    return [f"  Not written, not implemented yet (the trainer uses its default): {names}"]
