"""How image datasets link their conditioning datasets, and the rules those links follow.

An image dataset names its conditioning datasets with ``conditioning_data``
(one id or a list); a conditioning dataset may instead name its image dataset
with ``source_dataset_id``. Both spellings give the same link. A conditioning
dataset holds either control images (``conditioning_type`` controlnet, the
default) or loss masks (mask).
"""

from __future__ import annotations

import logging
import os

from simpletuner.data.dataset_spec import DatasetSpec

logger = logging.getLogger("simpletuner.data")

CONDITIONING = "conditioning"
CONTROLNET = "controlnet"
MASK = "mask"


def conditioning_type(spec: DatasetSpec) -> str:
    """controlnet unless the dataset says otherwise."""
    return spec.conditioning_type or CONTROLNET


def conditioning_links(specs: list[DatasetSpec]) -> dict[str, list[DatasetSpec]]:
    """Enabled image dataset id -> its enabled conditioning datasets, in the order they were named."""
    by_id = {spec.id: spec for spec in specs if not spec.disabled}
    links: dict[str, list[DatasetSpec]] = {}
    for spec in by_id.values():
        for target_id in spec.conditioning_data or ():
            target = by_id.get(target_id)
            if target is not None and target.dataset_type == CONDITIONING:
                _add_link(links, spec.id, target)
    for spec in by_id.values():
        source = by_id.get(spec.source_dataset_id or "")
        if spec.dataset_type == CONDITIONING and source is not None:
            _add_link(links, source.id, spec)
    return links


def _add_link(links: dict[str, list[DatasetSpec]], image_id: str, conditioning: DatasetSpec) -> None:
    linked = links.setdefault(image_id, [])
    if all(existing.id != conditioning.id for existing in linked):
        linked.append(conditioning)


def check_conditioning(specs: list[DatasetSpec], settings, problems) -> None:
    """Add a problem for every broken link, unusable conditioning dataset, or link the run cannot use.

    ``problems`` has ``add(label, key, message)`` (dataset_config's collector).
    """
    by_id = {spec.id: spec for spec in specs}
    for spec in specs:
        if spec.disabled:
            continue
        if spec.conditioning_data:
            _check_conditioning_data(spec, by_id, problems)
        if spec.dataset_type == CONDITIONING:
            _check_conditioning_dataset(spec, by_id, problems)
    links = conditioning_links(specs)
    _check_against_settings(specs, links, settings, problems)
    linked = {conditioning.id for linked_specs in links.values() for conditioning in linked_specs}
    for spec in specs:
        if spec.dataset_type == CONDITIONING and not spec.disabled and spec.id not in linked:
            logger.warning("%s: no image dataset links this conditioning dataset (conditioning_data or "
                           "source_dataset_id), so it is not used.", spec.where())


def _check_conditioning_data(spec: DatasetSpec, by_id: dict[str, DatasetSpec], problems) -> None:
    label = f"dataset '{spec.id}'"
    if spec.dataset_type != "image":
        problems.add(label, "conditioning_data", f"only image datasets can link conditioning datasets, not "
                                                 f"dataset_type {spec.dataset_type!r}; remove the key.")
        return
    for target_id in spec.conditioning_data:
        target = by_id.get(target_id)
        if target is None:
            problems.add(label, "conditioning_data", f"no dataset has the id {target_id!r}; use the id of a "
                                                     "dataset with \"dataset_type\": \"conditioning\".")
        elif target.disabled:
            problems.add(label, "conditioning_data", f"dataset {target_id!r} is disabled; enable it or remove it "
                                                     "from conditioning_data.")
        elif target.dataset_type != CONDITIONING:
            problems.add(label, "conditioning_data", f"dataset {target_id!r} has dataset_type "
                                                     f"{target.dataset_type!r}; a conditioning dataset needs "
                                                     "\"dataset_type\": \"conditioning\".")


def _check_conditioning_dataset(spec: DatasetSpec, by_id: dict[str, DatasetSpec], problems) -> None:
    label = f"dataset '{spec.id}'"
    if spec.type == "local":
        if not spec.instance_data_dir:
            problems.add(label, "instance_data_dir", "is required for a local conditioning dataset; give the "
                                                     "folder holding the conditioning images.")
        elif not os.path.isdir(spec.instance_data_dir):
            problems.add(label, "instance_data_dir", f"folder {spec.instance_data_dir!r} does not exist; fix the "
                                                     "path.")
    source_id = spec.source_dataset_id
    if source_id:
        source = by_id.get(source_id)
        if source is None or source.disabled or source.dataset_type != "image":
            problems.add(label, "source_dataset_id", f"{source_id!r} is not an enabled image dataset; give the id "
                                                     "of the image dataset these conditioning images belong to.")


def _check_against_settings(specs: list[DatasetSpec], links: dict[str, list[DatasetSpec]], settings,
                            problems) -> None:
    training = [spec for spec in specs if not spec.disabled and spec.dataset_type == "image"]
    # controlnet trains a ControlNet on the control images; control (channel control) concatenates their latents.
    controlled = next((name for name in ("controlnet", "control") if getattr(settings, name, False)), None)
    for spec in training:
        control_sets = [c.id for c in links.get(spec.id, []) if conditioning_type(c) == CONTROLNET]
        label = f"dataset '{spec.id}'"
        if control_sets and not controlled:
            problems.add(label, "conditioning_data", f"links the ControlNet conditioning dataset(s) "
                                                     f"{', '.join(control_sets)}, but controlnet is off. Set "
                                                     "controlnet=true to train a ControlNet (or "
                                                     "control=true for channel control), or give those datasets "
                                                     "\"conditioning_type\": \"mask\" if they hold loss masks.")
        if controlled and not control_sets:
            problems.add(label, "conditioning_data", f"{controlled}=true needs a control image for every training "
                                                     "image: add a dataset with \"dataset_type\": \"conditioning\" "
                                                     "holding images named like this dataset's, and set "
                                                     "\"conditioning_data\" to its id.")
    if controlled and not getattr(settings, "eval_loss_disable", False):
        for spec in specs:
            if spec.dataset_type == "eval" and not spec.disabled:
                problems.add(f"dataset '{spec.id}'", "dataset_type", "eval loss on eval datasets is not "
                                                                     f"implemented for {controlled}=true runs; set "
                                                                     "eval_loss_disable=true or disable this "
                                                                     "dataset.")
