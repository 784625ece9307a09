"""`simpletuner cache` builds once; a second run re-encodes nothing; a changed resolution is re-encoded and `check` says why."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.images import copy_sample_images
from helpers.runs import base_config
from simpletuner.cli import main as cli_main


def cache_files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (root / "cache").rglob("*.safetensors")}


def test_second_run_reencodes_nothing_and_resolution_change_does(tiny_model, sample_images, tmp_path, monkeypatch,
                                                                 capsys):
    copy_sample_images(sample_images, tmp_path / "images", count=4)
    model = tiny_model("sd1x")
    (tmp_path / "config").mkdir()
    config = base_config("sd1x", model, tmp_path, tmp_path / "images")
    (tmp_path / "config" / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)

    assert cli_main(["cache"]) == 0
    first = cache_files(tmp_path)
    assert len([p for p in first if "/vae/" in p]) == 4
    assert cli_main(["cache"]) == 0
    assert cache_files(tmp_path) == first, "the second cache run rewrote entries"
    assert "4 cached, 0 to encode" in capsys.readouterr().out

    datasets_path = Path(config["data_backend_config"])
    datasets = json.loads(datasets_path.read_text())
    datasets[0]["resolution"] = 128
    datasets_path.write_text(json.dumps(datasets))
    assert cli_main(["check", "--override_dataset_config=true"]) == 0
    report = capsys.readouterr().out
    assert "4 to encode" in report and "resolution or crop changed" in report, report
