"""The interactive `simpletuner configure` wizard.

Modules, one job each:

- ``prompts``: thin wrappers over questionary that raise KeyboardInterrupt on Ctrl-C.
- ``availability``: which options and choices may be offered here (status, gated hardware).
- ``recommendations``: per-family starting values (resolution, learning rate, ...).
- ``draft``: the configuration being built or edited, and what gets written.
- ``datasets``: the multidatabackend.json entries the wizard writes or edits.
- ``sections``: the questions, grouped in sections (model, LoRA, data, ...).
- ``summary``: the text shown before anything is written.
- ``files``: atomic writing of several files at once.
- ``flow``: the two entry points, a new config and editing an existing one.
"""

from simpletuner.wizard.flow import edit_config, new_config

__all__ = ["new_config", "edit_config"]
