"""Fixtures for the family tests: each test module names the families it covers in FAMILIES."""

from __future__ import annotations

import pytest
import torch

from helpers.families import make_family


@pytest.fixture(scope="module")
def model_dirs(request, tiny_model) -> dict[str, str]:
    """family -> folder of its tiny model, for each family in the module's FAMILIES."""
    return {family: tiny_model(family) for family in request.module.FAMILIES}


@pytest.fixture(scope="module")
def loaded(request, model_dirs) -> dict:
    """family -> the family with its components loaded on the CPU in float32, once per module."""
    families = {}
    for family in request.module.FAMILIES:
        model = make_family(model_dirs, family)
        model.load(torch.device("cpu"), torch.float32)
        families[family] = model
    return families
