"""Validation end to end on the tiny SDXL: images, benchmark stitching, eval loss and CLIP scores in TensorBoard."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.runs import base_config, train


def build_tiny_clip(folder: Path) -> str:
    """A random-weight CLIP model and processor saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from simpletuner.models.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from simpletuner.models.tiny import build_tiny

    return build_tiny("sdxl", str(tmp_path_factory.mktemp("models") / "sdxl"))


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    from simpletuner.demo.sample_data import make_sample_images

    root = tmp_path_factory.mktemp("images")
    make_sample_images(str(root / "train"), count=4)
    make_sample_images(str(root / "eval"), count=2)
    return root


def add_eval_dataset(config: dict, images: Path, cache: Path) -> None:
    path = Path(config["data_backend_config"])
    datasets = json.loads(path.read_text())
    datasets.insert(1, {"id": "held-out", "type": "local", "dataset_type": "eval", "instance_data_dir": str(images),
                        "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
                        "minimum_image_size": 32, "crop": True, "crop_style": "center", "crop_aspect": "square",
                        "cache_dir_vae": str(cache)})
    path.write_text(json.dumps(datasets))


def scalars(output: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[int, float] = {}
    for events in glob.glob(str(output / "logs" / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(os.path.dirname(events), size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            found.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return found


def image_tags(output: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in glob.glob(str(output / "logs" / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(os.path.dirname(events), size_guidance={"images": 0})
        accumulator.Reload()
        tags.update(accumulator.Tags()["images"])
    return tags


VALIDATION = {
    "validation_prompt": "a red circle", "validation_step_interval": 2, "validation_resolution": "64,96x64",
    "num_validation_images": 2, "validation_num_inference_steps": 2, "validation_disable_unconditional": True,
    "report_to": "tensorboard", "eval_steps_interval": 1, "eval_timesteps": 4, "max_train_steps": 2,
}


@pytest.fixture(scope="module")
def frozen_run(sdxl_model, image_sets, tiny_clip, tmp_path_factory):
    """Two steps with learning_rate=0: the weights never change."""
    root = tmp_path_factory.mktemp("frozen")
    config = base_config("sdxl", sdxl_model, root, image_sets / "train", learning_rate=0.0, evaluation_type="clip",
                         pretrained_evaluation_model_name_or_path=tiny_clip, num_eval_images=1, **VALIDATION)
    add_eval_dataset(config, image_sets / "eval", root / "cache" / "vae-eval")
    train(config)
    return root / "output"


def test_validation_writes_each_resolution_and_image(frozen_run):
    names = sorted(os.listdir(frozen_run / "validation_images"))
    assert names == ["step000002_validation_64x64_0.png", "step000002_validation_64x64_1.png",
                     "step000002_validation_96x64_0.png", "step000002_validation_96x64_1.png"]
    assert {"validation/validation_64x64", "validation/validation_96x64"} <= image_tags(frozen_run)


def test_benchmark_is_stitched_beside_the_validation_image(frozen_run):
    with Image.open(frozen_run / "validation_images" / "step000002_validation_96x64_1.png") as saved:
        stitched = saved.convert("RGB")
    assert stitched.size == (2 * 96, 64)
    with Image.open(frozen_run / "benchmarks" / "base_validation_96x64_1.png") as base:
        benchmark = base.convert("RGB")
    assert stitched.crop((0, 0, 96, 64)).tobytes() == benchmark.tobytes()
    # learning_rate=0 left the weights untouched, so the trained half shows the base model's image again.
    assert stitched.crop((96, 0, 192, 64)).tobytes() == benchmark.tobytes()


def test_eval_loss_is_logged_at_the_interval_and_repeats_for_equal_weights(frozen_run):
    losses = scalars(frozen_run, "eval_loss")
    assert sorted(losses) == [1, 2]
    assert losses[1] == losses[2] and losses[1] > 0
    assert sorted(scalars(frozen_run, "eval_loss/held-out")) == [1, 2]


def test_clip_score_is_computed_against_the_prompt(frozen_run):
    means = scalars(frozen_run, "clip/mean")
    assert sorted(means) == [1, 2]
    assert all(0.0 <= value <= 1.0 for value in means.values())
    assert means[1] == pytest.approx(means[2])  # same weights, same seed: the same images


def test_training_run_with_ema_comparison_and_startup_round(sdxl_model, image_sets, tmp_path):
    config = base_config("sdxl", sdxl_model, tmp_path, image_sets / "train", learning_rate=5e-2, disable_benchmark=True,
                         use_ema=True, ema_validation="comparison", validation_on_startup=True,
                         **{**VALIDATION, "validation_step_interval": 100, "num_validation_images": 1})
    add_eval_dataset(config, image_sets / "eval", tmp_path / "cache" / "vae-eval")
    train(config)
    output = tmp_path / "output"
    losses = scalars(output, "eval_loss")
    assert sorted(losses) == [1, 2]
    assert losses[1] != losses[2], "training changed the weights, so the eval loss must move"
    # A startup round (step 0) and, since interval 100 is never reached, the end-of-training round.
    names = sorted(os.listdir(output / "validation_images"))
    assert names == ["step000000_validation_64x64_0.png", "step000000_validation_96x64_0.png",
                     "step000002_validation_64x64_0.png", "step000002_validation_96x64_0.png"]
    with Image.open(output / "validation_images" / "step000002_validation_64x64_0.png") as saved:
        stitched = saved.convert("RGB")
    assert stitched.size == (2 * 64, 64)  # trained weights, then EMA weights
    trained, averaged = stitched.crop((0, 0, 64, 64)), stitched.crop((64, 0, 128, 64))
    assert trained.tobytes() != averaged.tobytes()


def test_benchmark_cache_is_reused_only_for_the_same_fingerprint(tmp_path):
    from simpletuner.validation.benchmark import Benchmark
    from simpletuner.validation.images import RenderKey
    from simpletuner.validation.prompts import ValidationPrompt

    prompts = {"validation": ValidationPrompt("validation", "a red circle")}
    key = RenderKey("validation", 64, 32, 0)
    Benchmark(str(tmp_path), "abc").save(prompts, {key: Image.new("RGB", (64, 32), (1, 2, 3))})
    reused = Benchmark(str(tmp_path), "abc")
    assert reused.load(prompts, [key]) and reused.beside(key).getpixel((0, 0)) == (1, 2, 3)
    assert not Benchmark(str(tmp_path), "changed").load(prompts, [key])
    assert not Benchmark(str(tmp_path), "abc").load(prompts, [RenderKey("validation", 64, 32, 1)])


def test_clip_scorer_scores_matching_prompts(tiny_clip):
    from simpletuner.validation.clip_score import ClipScorer, summarize

    scorer = ClipScorer(tiny_clip, torch.device("cpu"))
    red, blue = Image.new("RGB", (48, 48), (220, 20, 20)), Image.new("RGB", (48, 48), (20, 20, 220))
    scores = scorer.score([red, blue, red], ["a red square", "a blue square", "a blue square"])
    assert scores.shape == (3,)
    assert torch.all((scores >= 0) & (scores <= 1))
    assert scores[0] != scores[2]  # the prompt changes the score of the same image
    assert set(summarize(scores)) == {"clip/mean", "clip/min", "clip/max", "clip/std"}


def test_clip_scorer_names_the_option_for_a_missing_model(tmp_path):
    from simpletuner.config.errors import ConfigError
    from simpletuner.validation.clip_score import ClipScorer

    with pytest.raises(ConfigError, match="pretrained_evaluation_model_name_or_path"):
        ClipScorer(str(tmp_path / "nothing-here"), torch.device("cpu"))
