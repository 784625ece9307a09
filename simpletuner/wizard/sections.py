"""The wizard's questions, one function per section.

Each section reads the current values from the session's draft (so editing an
existing config shows its values as defaults) and stores the answers back.
Questions about options that are not built yet are skipped and named at the
end of the section.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from questionary import Choice

from simpletuner.wizard import availability, families, prompts
from simpletuner.wizard.datasets import CAPTION_STRATEGIES, DataAnswers
from simpletuner.wizard.session import Session

LORA_TYPES = {"standard": "standard (PEFT LoRA)", "lycoris": "lycoris (LoKr and friends, via LyCORIS)"}
MODEL_TYPES = {"lora": "lora: train a small adapter (recommended)", "full": "full: update every weight"}
NOT_AVAILABLE_SUFFIX = "  (model code not available yet)"
# Our own starting point for a LyCORIS LoKr adapter; the user can edit the written file.
LYCORIS_TEMPLATE = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {
        "target_module": ["Attention", "FeedForward"],
        "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}},
    },
}


def _option_select(session: Session, name: str, message: str, recommended, labels: dict | None = None):
    """Ask a choice option, offering only the choices that are built and runnable on this machine."""

    def asker(default):
        usable = availability.usable_choices(name)  # may import torch to look at the GPU, so only when asked
        hidden = availability.hidden_choices(name)
        if hidden:
            prompts.say(f"  Not offered here: {'; '.join(hidden)}")
        if not usable:
            prompts.say(f"  No value of {name} can be used here; keeping {default!r}.")
            return default
        choices = [Choice(title=(labels or {}).get(c, str(c)), value=c) for c in usable]
        fallback = default if default in usable else (recommended if recommended in usable else None)
        return prompts.select(message, choices, fallback)

    return session.ask(name, recommended, asker)


def _family_choice(session: Session) -> str:
    available = families.available_families()

    def asker(default):
        choices = []
        for family in availability.usable_choices("model_family"):
            suffix = "" if not available or family in available else NOT_AVAILABLE_SUFFIX
            choices.append(Choice(title=family + suffix, value=family))
        return prompts.select("Model family", choices, default)

    return session.ask("model_family", "sdxl", asker)


def _flavour(session: Session, family: str) -> None:
    if not availability.is_offered("model_flavour"):
        session.skipped.append("model_flavour")
        return
    info = families.describe(family)
    known = list(info.flavours)
    hint = f"known: {', '.join(known)}; " if known else ""

    def check(answer: str):
        answer = answer.strip()
        if answer and info.available and known and answer not in known:
            return f"{answer!r} is not a {family} flavour; choose one of: {', '.join(known)} (or leave empty)."
        return True

    recommended = info.default_flavour or (known[0] if known else "")
    session.ask("model_flavour", recommended, lambda default: prompts.text(
        "Model flavour", default, f"({hint}empty for the family's default)", check) or None)


def _base_model(session: Session, family: str) -> None:
    flavour = session.draft.current("model_flavour")
    info = families.describe(family) if availability.is_offered("pretrained_model_name_or_path") else None
    location = info.flavours.get(flavour or info.default_flavour or "", "") if info else ""
    if location:
        note = f"(empty uses the flavour's model: {location})"
    else:
        note = "(hub id or local folder; empty for the flavour's default)"
    session.ask("pretrained_model_name_or_path", None, lambda default: prompts.text(
        "Base model (Hugging Face id or local path)", default, note) or None)


def model_section(session: Session) -> None:
    family = _family_choice(session)
    available = families.available_families()
    if available and family not in available:
        prompts.say(f"  Note: the {family} model code is not available yet; this config will not train until it is.")
    _flavour(session, family)
    _base_model(session, family)
    _option_select(session, "model_type", "Model type", "lora", MODEL_TYPES)
    _option_select(session, "mixed_precision", "Mixed precision", "bf16")
    _option_select(session, "base_model_precision", "Base model precision (quantisation of the frozen weights)",
                   "no_change")


def lora_section(session: Session) -> None:
    if session.draft.current("model_type") != "lora":
        prompts.say("  The model type is 'full', so there are no LoRA settings to ask about.")
        return
    lora_type = _option_select(session, "lora_type", "LoRA type", "standard", LORA_TYPES)
    session.extra_files.pop(_lycoris_path(session), None)
    if lora_type == "lycoris":
        _lycoris_file(session)
        return
    session.ask("lora_rank", session.recommended.lora_rank,
                lambda default: prompts.integer("LoRA rank", default, minimum=1))


def _lycoris_path(session: Session) -> str:
    return os.path.join(os.path.dirname(session.config_path), "lycoris_config.json")


def _lycoris_file(session: Session) -> None:
    """Point lycoris_config at a LyCORIS file: the config's own if it exists, else a new one beside config.json."""
    named = session.draft.loaded.get("lycoris_config")
    if named and os.path.isfile(named):
        return
    path = _lycoris_path(session)
    if not os.path.exists(path):
        session.extra_files[path] = json.dumps(LYCORIS_TEMPLATE, indent=4) + "\n"
        prompts.say(f"  A LoKr starting config will be written to {path}; edit it to change the adapter.")
    session.draft.set("lycoris_config", session.path_for_config(path))


def data_section(session: Session) -> None:
    before = session.datasets.current()
    recommended = session.recommended
    folder = prompts.text("Dataset folder (your images)", before.folder if before else "", None,
                          lambda answer: True if answer.strip() else "Enter the folder that holds your images.")
    while not os.path.isdir(folder) and not prompts.confirm(f"{folder} is not a folder here. Use it anyway?", False):
        folder = prompts.text("Dataset folder (your images)", folder)
    area = session.datasets.resolution_type() == "area"
    unit = "megapixels" if area else "pixels, the side of a square of the same area"
    resolution = prompts.number("Training resolution", before.resolution if before else recommended.resolution,
                                minimum=0, instruction=f"({unit})")
    strategy = prompts.select("How are the images captioned?",
                              [Choice(title=label, value=key) for key, label in CAPTION_STRATEGIES.items()],
                              before.caption_strategy if before else "textfile")
    instance_prompt = None
    if strategy == "instanceprompt":
        instance_prompt = prompts.text("Instance prompt (the caption for every image)",
                                       (before.instance_prompt if before else "") or "",
                                       validate=lambda answer: True if answer.strip() else "Enter a prompt.")
    repeats = prompts.integer("Dataset repeats (0 = each image once per epoch)", before.repeats if before else 0,
                              minimum=0)
    session.datasets.apply(DataAnswers(folder, resolution, strategy, instance_prompt, repeats), session.family)
    session.draft.set("data_backend_config", session.path_for_config(session.dataset_path))


def optimizer_section(session: Session) -> None:
    recommended = session.recommended
    _option_select(session, "optimizer", "Which optimizer?", recommended.optimizer)
    model_type = session.draft.current("model_type")
    session.ask("learning_rate", recommended.learning_rate(model_type),
                lambda default: prompts.number("Learning rate", default, minimum=0))
    _option_select(session, "lr_scheduler", "Scheduler for the learning rate", recommended.lr_scheduler)


def _length(session: Session) -> None:
    """Steps or epochs, whichever the user picks among the ones that are built."""
    offered = [name for name in ("max_train_steps", "num_train_epochs") if availability.is_offered(name)]
    if not offered:
        session.skipped.extend(["max_train_steps", "num_train_epochs"])
        return
    unit = offered[0]
    if len(offered) == 2:
        using_epochs = session.draft.editing and not session.draft.current("max_train_steps")
        unit = prompts.select("Train for a number of", [Choice("steps (max_train_steps)", "max_train_steps"),
                                                       Choice("epochs (num_train_epochs)", "num_train_epochs")],
                              "num_train_epochs" if using_epochs else "max_train_steps")
    if unit == "max_train_steps":
        session.ask(unit, session.recommended.max_train_steps,
                    lambda default: prompts.integer("Training steps", default, minimum=1))
        if "num_train_epochs" in offered:
            session.draft.set("num_train_epochs", 0)
    else:
        session.ask(unit, 10, lambda default: prompts.integer("Training epochs", default, minimum=1))
        if "max_train_steps" in offered:
            session.draft.set("max_train_steps", None)


def schedule_section(session: Session) -> None:
    _length(session)
    session.ask("train_batch_size", session.recommended.train_batch_size,
                lambda default: prompts.integer("Batch size per GPU", default, minimum=1))
    session.ask("gradient_accumulation_steps", 1,
                lambda default: prompts.integer("Gradient accumulation steps", default, minimum=1))


def validation_section(session: Session) -> None:
    prompt = session.ask("validation_prompt", None, lambda default: prompts.text(
        "Validation prompt", default, "(empty: no validation images)") or None)
    if not prompt:
        return
    recommended = session.recommended
    session.ask("validation_step_interval", recommended.validation_step_interval,
                lambda default: prompts.integer("Make validation images every N steps", default, minimum=1))
    session.ask("validation_resolution", recommended.validation_resolution(),
                lambda default: prompts.text("Validation resolution", default, "(e.g. 1024x1024, comma-separated)"))


def checkpoint_section(session: Session) -> None:
    session.ask("checkpoint_step_interval", session.recommended.checkpoint_step_interval,
                lambda default: prompts.integer("Save a checkpoint every N steps", default, minimum=1, allow_empty=True,
                                                instruction="(empty: only at the end)"))


def logging_section(session: Session) -> None:
    _option_select(session, "report_to", "Report metrics to", "tensorboard")
    default_output = os.path.join("output", session.env_name or "models")
    session.ask("output_dir", default_output, lambda default: prompts.text(
        "Output folder (checkpoints and the trained model)", default,
        validate=lambda answer: True if answer.strip() else "Enter a folder."))


SECTIONS: dict[str, tuple[str, Callable[[Session], None]]] = {
    "model": ("Model (family, flavour, base model, precision)", model_section),
    "lora": ("LoRA (type and rank)", lora_section),
    "data": ("Data (dataset folder, resolution, captions, repeats)", data_section),
    "optimizer": ("Optimizer (optimizer, learning rate, schedule)", optimizer_section),
    "schedule": ("Schedule (length, batch size, gradient accumulation)", schedule_section),
    "validation": ("Validation (prompt and interval)", validation_section),
    "checkpoints": ("Checkpoints (interval)", checkpoint_section),
    "logging": ("Logging and output (trackers, output folder)", logging_section),
}


def run_section(session: Session, key: str) -> None:
    title, ask = SECTIONS[key]
    prompts.say(f"\n== {title} ==")
    session.skipped = []
    ask(session)
    if session.skipped:
        prompts.say(f"  (not asked, not implemented yet: {', '.join(sorted(set(session.skipped)))})")
