"""The two ways through the wizard: a new config, or editing an existing config.json.

Both end the same way: a summary, a confirmation (which names any file that
would be replaced), then one atomic write of every file. Ctrl-C raises
KeyboardInterrupt out of here; the CLI reports it.
"""

from __future__ import annotations

import json
import os
import re

from simpletuner.config.errors import ConfigError
from simpletuner.wizard import prompts
from simpletuner.wizard.datasets import DatasetFile
from simpletuner.wizard.draft import Draft
from simpletuner.wizard.files import write_files
from simpletuner.wizard.sections import SECTIONS, run_section
from simpletuner.wizard.session import Session
from simpletuner.wizard.summary import changes_summary, new_config_summary

CONFIG_FOLDER = "config"
DATASET_FILE_NAME = "multidatabackend.json"
SAVE, QUIT = "save", "quit"
ENV_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_env_name(answer: str) -> bool | str:
    answer = answer.strip()
    if not answer or (ENV_NAME.match(answer) and answer not in (".", "..")):
        return True
    return "Use letters, digits, '-', '_' or '.' only (it becomes a folder name under config/)."


def new_config() -> int:
    prompts.say("simpletuner configure: answer each question, Enter keeps the suggested value, Ctrl-C stops "
                "without writing anything.")
    env = prompts.text("Config environment name", "", "(empty: config/config.json; a name: config/<name>/config.json)",
                       _check_env_name) or None
    folder = os.path.join(CONFIG_FOLDER, env) if env else CONFIG_FOLDER
    session = Session(Draft(), DatasetFile(), os.path.join(folder, "config.json"),
                      os.path.join(folder, DATASET_FILE_NAME), env)
    for key in SECTIONS:
        run_section(session, key)
    prompts.say(new_config_summary(session))
    return _write(session, _files(session, include_config=True, include_datasets=True), asking_to_save=False)


def _read_config(path: str) -> dict:
    if not path.endswith(".json"):
        raise ConfigError("configure", f"{path}: only config.json files can be edited by the wizard.")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError("configure", f"Could not read {path}: {exc}. "
                                       "Check the path and that the file holds JSON.") from None
    if not isinstance(raw, dict):
        raise ConfigError("configure", f"{path} must hold a JSON object of option names and values.")
    return raw


def _dataset_location(draft: Draft, config_path: str) -> tuple[str, DatasetFile]:
    """Where the config's dataset file is (its own setting, else beside the config) and its contents."""
    beside = os.path.join(os.path.dirname(config_path), DATASET_FILE_NAME)
    named = draft.current("data_backend_config")
    for candidate in ([named, os.path.join(os.path.dirname(config_path), named)] if named else []) + [beside]:
        if os.path.isfile(candidate):
            return candidate, DatasetFile.load(candidate)
    return (named or beside), DatasetFile()


def edit_config(path: str) -> int:
    draft = Draft(_read_config(path), source=path)
    for problem in draft.unreadable:
        prompts.say(f"  Warning: {problem} (kept as it is)")
    dataset_path, datasets = _dataset_location(draft, path)
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    session = Session(draft, datasets, path, dataset_path, None if parent == CONFIG_FOLDER else parent)
    prompts.say(f"Editing {path}. Pick a section to change; its questions show the current values.")
    choices = [prompts.Choice(title, key) for key, (title, _) in SECTIONS.items()]
    choices += [prompts.Choice("Save and exit", SAVE), prompts.Choice("Quit without saving", QUIT)]
    while True:
        key = prompts.select("Which section?", choices, SAVE)
        if key == QUIT:
            prompts.say("Nothing was written.")
            return 0
        if key == SAVE:
            break
        run_section(session, key)
    if not draft.changed() and not datasets.changed and not session.extra_files:
        prompts.say("No changes; nothing was written.")
        return 0
    prompts.say(changes_summary(session))
    files = _files(session, include_config=bool(draft.changed()), include_datasets=datasets.changed)
    return _write(session, files, asking_to_save=True)


def _files(session: Session, include_config: bool, include_datasets: bool) -> dict[str, str]:
    files: dict[str, str] = {}
    if include_datasets:
        files[session.dataset_path] = session.datasets.text()
    files.update(session.extra_files)
    if include_config:
        files[session.config_path] = json.dumps(session.draft.output(), indent=4) + "\n"
    return files


def _write(session: Session, files: dict[str, str], asking_to_save: bool) -> int:
    existing = [path for path in files if os.path.exists(path)]
    if asking_to_save:
        question, default = "Save these changes?", True
    elif existing:
        question, default = f"Replace the existing {', '.join(existing)}?", False
    else:
        question, default = "Write these files?", True
    if not prompts.confirm(question, default):
        prompts.say("Nothing was written.")
        return 1
    write_files(files)
    prompts.say("Wrote " + ", ".join(files) + ".")
    prompts.say(f"Check it with: {_check_command(session)}")
    return 0


def _check_command(session: Session) -> str:
    config_path = os.path.normpath(session.config_path)
    if config_path == os.path.join(CONFIG_FOLDER, "config.json"):
        return "simpletuner check"
    if session.env_name and config_path == os.path.join(CONFIG_FOLDER, session.env_name, "config.json"):
        return f"simpletuner check --env {session.env_name}"
    return f"CONFIG_BACKEND=json CONFIG_PATH={config_path} simpletuner check"
