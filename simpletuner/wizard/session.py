"""Everything one wizard run works on: the draft config, its dataset file and where they go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from simpletuner.wizard import availability
from simpletuner.wizard.datasets import DatasetFile
from simpletuner.wizard.draft import Draft
from simpletuner.wizard.recommendations import FamilyDefaults, defaults_for


@dataclass
class Session:
    draft: Draft
    datasets: DatasetFile
    config_path: str  # the config.json to write
    dataset_path: str  # the multidatabackend.json to write
    env_name: str | None = None
    extra_files: dict[str, str] = field(default_factory=dict)  # path -> text, e.g. a LyCORIS config
    skipped: list[str] = field(default_factory=list)  # questions left out in the current section

    @property
    def family(self) -> str:
        return self.draft.current("model_family") or "sdxl"

    @property
    def recommended(self) -> FamilyDefaults:
        return defaults_for(self.draft.current("model_family"))

    def ask(self, name: str, recommended: Any, asker: Callable[[Any], Any]) -> Any:
        """Ask about option ``name`` (default: current value or ``recommended``) unless it is not offered here.

        Returns the answer, or the current value when the question was skipped.
        """
        if not availability.is_offered(name):
            self.skipped.append(name)
            return self.draft.current(name)
        answer = asker(self.draft.suggestion(name, recommended))
        self.draft.set(name, answer)
        return answer

    def path_for_config(self, path: str) -> str:
        """How a companion file is named inside config.json: relative to the working folder when inside it."""
        absolute = os.path.abspath(path)
        relative = os.path.relpath(absolute, os.getcwd())
        return absolute if relative.startswith("..") else relative
