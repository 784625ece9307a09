"""Atomic writes: a finished write replaces the file, a failed one leaves it as it was and no litter."""

import pytest
import torch
from safetensors.torch import load_file

from simpletuner.atomic_files import save_safetensors, staged_path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with staged_path(str(target)) as staging:
            with open(staging, "w") as out:
                out.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_finished_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "weights.safetensors"
    save_safetensors({"a": torch.arange(4.0).view(2, 2).t()}, str(target), {"format": "pt"})
    assert torch.equal(load_file(str(target))["a"], torch.arange(4.0).view(2, 2).t())
    save_safetensors({"a": torch.zeros(1)}, str(target))
    assert torch.equal(load_file(str(target))["a"], torch.zeros(1))
    assert [p.name for p in target.parent.iterdir()] == ["weights.safetensors"]
