"""validation_using_datasets: dataset images (with their captions) as inputs for image-to-image validation.

From every training image dataset, or only the one named by eval_dataset_id
(an image or eval dataset), ``num_eval_images`` images are chosen with the
validation seed, so the same images come back on every start while the
dataset is unchanged. Each is resized and cropped exactly as training planned
it; the render keeps that size and uses the image's first caption as prompt.
"""

from __future__ import annotations

import os
import random

from simpletuner.config.errors import ConfigError
from simpletuner.data.dataset_config import PRIMARY_DATASET_TYPES
from simpletuner.data.types import ImageRecord
from simpletuner.validation.images import fixed_seed
from simpletuner.validation.prompts import ValidationPrompt, slug


def input_dataset_ids(settings, specs: dict) -> list[str]:
    """Ids of the datasets validation inputs come from; raises for an unusable eval_dataset_id."""
    chosen = settings.eval_dataset_id
    if chosen is None:
        return [dataset_id for dataset_id, spec in specs.items() if spec.dataset_type == "image"]
    usable = sorted(dataset_id for dataset_id, spec in specs.items() if spec.dataset_type in PRIMARY_DATASET_TYPES)
    if chosen not in usable:
        raise ConfigError("eval_dataset_id", f"eval_dataset_id={chosen!r} names no image or eval dataset in "
                                             f"{settings.data_backend_config}; choose one of: "
                                             f"{', '.join(usable) or '(none)'}.")
    return [chosen]


def dataset_prompts(trainer, taken: set[str] = frozenset()) -> list[ValidationPrompt]:
    """The img2img validation prompts: chosen dataset images with their captions.

    Short names are ``<dataset>_<file stem>``, suffixed where one is already in ``taken``.
    """
    settings, data = trainer.settings, trainer.data
    count = max(1, int(settings.num_eval_images or 1))
    prompts: list[ValidationPrompt] = []
    used = set(taken)
    for dataset_id in input_dataset_ids(settings, data.specs):
        records, storage = _records_and_storage(trainer, dataset_id)
        chooser = random.Random(f"{fixed_seed(settings)}:{dataset_id}")
        chosen = chooser.sample(records, min(count, len(records)))
        for record in sorted(chosen, key=lambda r: r.path):
            prompts.append(_prompt(dataset_id, record, storage, used))
            used.add(prompts[-1].shortname)
    if not prompts:
        raise ConfigError("validation_using_datasets", "validation_using_datasets found no images in "
                                                       f"{', '.join(input_dataset_ids(settings, data.specs))}; "
                                                       "add images or turn validation_using_datasets off.")
    return prompts


def _records_and_storage(trainer, dataset_id: str) -> tuple[list[ImageRecord], object]:
    state = trainer.data.datasets.get(dataset_id)
    if state is not None:
        return sorted(state.index.records, key=lambda r: r.path), state.storage
    from simpletuner.data.discovery import discover_dataset
    from simpletuner.data.storage.factory import make_storage

    spec = trainer.data.specs[dataset_id]
    storage = make_storage(spec, trainer.settings, "data")
    index = discover_dataset(spec, storage, trainer.settings, progress=False)
    return sorted(index.records, key=lambda r: r.path), storage


def _prompt(dataset_id: str, record: ImageRecord, storage, used: set[str]) -> ValidationPrompt:
    from simpletuner.data.transforms import apply_plan, load_image

    image = apply_plan(load_image(storage, record.path), record)
    stem = os.path.splitext(os.path.basename(record.path))[0]
    caption = record.captions[0] if record.captions else ""
    base = slug(f"{dataset_id}_{stem}")
    name, counter = base, 2
    while name in used:
        name, counter = f"{base[:44]}_{counter}", counter + 1
    return ValidationPrompt(name, caption, input_image=image,
                            input_source=f"{record.sample_id}:{record.source_stamp}")
