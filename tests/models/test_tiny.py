"""The tiny model builder: layout on disk, its tokenizer and the command line."""

import json
import os
import subprocess
import sys

import pytest

from simpletuner.models import tiny


def test_tokenizer_knows_common_words_and_pads_to_77():
    tokenizer = tiny.make_tokenizer()
    ids = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and ids[4] == tokenizer.eos_token_id  # bos, 3 words, eos
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    assert len(tokenizer("zebra").input_ids) > 3  # unknown words fall back to byte pieces


def test_sdxl_layout_and_configs(tmp_path):
    out = tiny.build_tiny("sdxl", str(tmp_path / "sdxl"))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(out, part)), part
    for name in ("tokenizer", "tokenizer_2"):
        assert os.path.isfile(os.path.join(out, name, "vocab.json"))
        assert os.path.isfile(os.path.join(out, name, "merges.txt"))
    with open(os.path.join(out, "vae", "config.json")) as handle:
        assert len(json.load(handle)["down_block_types"]) == 4  # 8x downsampling
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as handle:
        assert json.load(handle)["_class_name"] == "EulerDiscreteScheduler"
    with open(os.path.join(out, "unet", "config.json")) as handle:
        assert json.load(handle)["addition_embed_type"] == "text_time"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tiny-")]  # no staging left behind


def test_sd2x_scheduler_predicts_v(tmp_path):
    out = tiny.build_tiny("sd2x", str(tmp_path / "sd2x"))
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as handle:
        assert json.load(handle)["prediction_type"] == "v_prediction"


def test_reuses_its_own_model_and_refuses_other_content(tmp_path):
    with pytest.raises(ValueError, match="sd1x, sd2x, sdxl"):
        tiny.build_tiny("flux9", str(tmp_path / "x"))
    sd1 = tiny.build_tiny("sd1x", str(tmp_path / "sd1"))
    stamp = os.path.getmtime(os.path.join(sd1, "unet", "config.json"))
    assert tiny.build_tiny("sd1x", sd1) == sd1  # kept, not rebuilt
    assert os.path.getmtime(os.path.join(sd1, "unet", "config.json")) == stamp
    with pytest.raises(FileExistsError, match="StableDiffusionPipeline"):
        tiny.build_tiny("sdxl", sd1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="busy"):
        tiny.build_tiny("sd1x", str(tmp_path / "busy"))


def test_command_line_builds_once(tmp_path, capsys):
    out = tmp_path / "model"
    assert tiny.main(["--family", "sd1x", "--out", str(out)]) == 0
    assert "written" in capsys.readouterr().out and (out / "model_index.json").is_file()
    stamp = os.path.getmtime(out / "unet" / "config.json")
    command = [sys.executable, "-m", "simpletuner.models.tiny", "--family", "sd1x", "--out", str(out)]
    second = subprocess.run(command, check=True, capture_output=True, text=True)
    assert "nothing to do" in second.stdout
    assert os.path.getmtime(out / "unet" / "config.json") == stamp
