"""Resolution math, bucket sizes and crop plans, using the examples of DATALOADER.md / OPTIONS.md."""

import math
import random

import pytest

from simpletuner.data.buckets import (ASPECT_OUT_OF_RANGE, NO_BUCKET, TOO_SMALL, ImagePlan, SizeRejection,
                                      bucket_size, plan_image, uses_random_planning)
from simpletuner.data.dataset_spec import DatasetSpec


def spec(**values) -> DatasetSpec:
    values.setdefault("instance_data_dir", "/unused")
    return DatasetSpec(id="test", **values)


def target(width, height, **values):
    plan = plan_image(width, height, spec(**values), random.Random(0))
    assert isinstance(plan, ImagePlan), plan
    return plan.target_size


@pytest.mark.parametrize("size, expected", [
    ((1000, 1000), (1024, 1024)),
    ((1460, 1000), (1216, 832)),  # the examples OPTIONS.md gives for pixel_area 1024
    ((1000, 1460), (832, 1216)),
    ((4000, 4000), (1024, 1024)),
])
def test_pixel_area_1024_buckets_match_reference_examples(size, expected):
    assert target(*size, resolution=1024, resolution_type="pixel_area") == expected


@pytest.mark.parametrize("size, expected", [
    ((1000, 1000), (1024, 1024)),
    ((2000, 1000), (2048, 1024)),
    ((1000, 1500), (1024, 1536)),
    ((3000, 2000), (1536, 1024)),
])
def test_pixel_keeps_shorter_edge_at_resolution(size, expected):
    assert target(*size, resolution=1024, resolution_type="pixel") == expected


def test_area_one_megapixel_matches_reference_bucket_table():
    # "1.46": [1216, 832] in the 1.0-megapixel mapping of DATALOADER.md; a square is 1024x1024.
    assert target(1500, 1000, resolution=1.0, resolution_type="area") == (1216, 832)
    assert target(1000, 1000, resolution=1.0, resolution_type="area") == (1024, 1024)


def test_pixel_area_is_area_in_pixels_squared():
    for size in [(1000, 1000), (1460, 1000), (700, 1900)]:
        assert target(*size, resolution=1024, resolution_type="pixel_area") == target(
            *size, resolution=1024 * 1024 / 1e6, resolution_type="area")


def test_alignment_16_gives_finer_buckets():
    assert target(1460, 1000, resolution=1024, resolution_type="pixel_area", aspect_bucket_alignment=16) == (1232, 848)
    assert bucket_size(1.46, spec(resolution=1024, aspect_bucket_alignment=64)) == (1216, 832)


def test_rounding_groups_close_aspects_into_one_bucket():
    a = target(1461, 1000, resolution=512, resolution_type="pixel_area", aspect_bucket_rounding=1)
    b = target(1520, 1000, resolution=512, resolution_type="pixel_area", aspect_bucket_rounding=1)
    assert a == b


@pytest.mark.parametrize("size, kept", [((768, 1024), False), ((1280, 768), False),
                                        ((1760, 1024), True), ((1024, 1024), True)])
def test_minimum_image_size_pixel_reference_examples(size, kept):
    plan = plan_image(*size, spec(resolution=1024, resolution_type="pixel", minimum_image_size=1024), random.Random(0))
    assert isinstance(plan, ImagePlan) == kept
    if not kept:
        assert plan.category == TOO_SMALL and "shorter edge" in str(plan)


def test_minimum_image_size_pixel_area_compares_areas():
    rules = spec(resolution=1024, resolution_type="pixel_area", minimum_image_size=1024)
    assert isinstance(plan_image(1280, 960, rules, random.Random(0)), ImagePlan)
    rejected = plan_image(1000, 1000, rules, random.Random(0))
    assert isinstance(rejected, SizeRejection) and rejected.category == TOO_SMALL
    assert "1048576" in rejected.detail


def test_aspect_ratio_limits():
    rules = spec(minimum_aspect_ratio=0.5, maximum_aspect_ratio=2.0, resolution=256)
    assert plan_image(3000, 1000, rules, random.Random(0)).category == ASPECT_OUT_OF_RANGE
    assert plan_image(1000, 3000, rules, random.Random(0)).category == ASPECT_OUT_OF_RANGE
    assert isinstance(plan_image(1900, 1000, rules, random.Random(0)), ImagePlan)


def test_crop_without_downsample_crops_directly_from_the_original():
    # "a 4096x4096 image will be directly cropped to a 1024x1024 target"
    plan = plan_image(2048, 1536, spec(crop=True, crop_aspect="square", crop_style="center", resolution=1024),
                      random.Random(0))
    assert plan == ImagePlan(intermediate_size=(2048, 1536), crop_offset=(256, 512), target_size=(1024, 1024))


def test_maximum_image_size_downsamples_to_target_area_before_cropping():
    rules = spec(crop=True, crop_aspect="square", crop_style="random", resolution=1024,
                 resolution_type="pixel_area", maximum_image_size=1536, target_downsample_size=1280)
    plan = plan_image(3000, 2000, rules, random.Random(3))
    width, height = plan.intermediate_size
    assert math.isclose(width * height, 1280 * 1280, rel_tol=0.005)
    assert math.isclose(width / height, 1.5, rel_tol=0.005)
    assert plan.target_size == (1024, 1024)
    top, left = plan.crop_offset
    assert 0 <= top <= height - 1024 and 0 <= left <= width - 1024
    below_limit = plan_image(1400, 1400, rules, random.Random(3))
    assert below_limit.intermediate_size == (1400, 1400)


def test_small_image_is_enlarged_to_hold_the_crop():
    plan = plan_image(512, 384, spec(crop=True, crop_aspect="square", crop_style="center", resolution=1024,
                                     resolution_type="pixel"), random.Random(0))
    assert plan.target_size == (1024, 1024)
    assert plan.intermediate_size == (1365, 1024)
    assert plan.crop_offset == (0, 170)


def test_crop_styles():
    rules = dict(crop=True, crop_aspect="square", resolution=256, resolution_type="pixel")
    corner = plan_image(600, 400, spec(crop_style="corner", **rules), random.Random(0))
    assert corner.crop_offset == (400 - 256, 600 - 256)
    center = plan_image(600, 400, spec(crop_style="center", **rules), random.Random(0))
    assert center.crop_offset == (72, 172)
    offsets = {plan_image(600, 400, spec(crop_style="random", **rules), random.Random(seed)).crop_offset
               for seed in range(20)}
    assert len(offsets) > 5 and all(0 <= t <= 144 and 0 <= l <= 344 for t, l in offsets)
    again = plan_image(600, 400, spec(crop_style="random", **rules), random.Random(7))
    assert again == plan_image(600, 400, spec(crop_style="random", **rules), random.Random(7))


def test_crop_aspect_preserve_and_closest():
    preserve = target(1400, 1000, crop=True, crop_aspect="preserve", resolution=1024, resolution_type="pixel_area")
    assert preserve == bucket_size(1.4, spec(resolution=1024))
    closest = target(1400, 1000, crop=True, crop_aspect="closest", crop_aspect_buckets=(0.75, 1.0, 1.5),
                     resolution=1024, resolution_type="pixel_area")
    assert closest == bucket_size(1.5, spec(resolution=1024))


def test_crop_aspect_random_picks_from_the_list():
    rules = spec(crop=True, crop_aspect="random", crop_aspect_buckets=(1.0, 0.5, 2.0), resolution=1024,
                 resolution_type="pixel")
    targets = {plan_image(3000, 3000, rules, random.Random(seed)).target_size for seed in range(30)}
    assert targets == {(1024, 1024), (1024, 2048), (2048, 1024)}


def test_max_upscale_threshold_reference_examples():
    rules = dict(crop=True, crop_aspect="random", crop_aspect_buckets=(1.0, 0.5, 2.0), resolution=1024,
                 resolution_type="pixel")
    # Unset: every bucket is available, a 256x256 image is upscaled 4x.
    assert isinstance(plan_image(256, 256, spec(**rules), random.Random(0)), ImagePlan)
    limited = spec(max_upscale_threshold=0.2, **rules)
    refused = plan_image(256, 256, limited, random.Random(0))
    assert isinstance(refused, SizeRejection) and refused.category == NO_BUCKET
    # 1024/850 is about 1.2: the square bucket stays available.
    assert plan_image(850, 850, limited, random.Random(0)).target_size == (1024, 1024)
    # A 2:1 image fits the 1.0 and 2.0 buckets with little upscaling, never the 0.5 one.
    wide = {plan_image(2000, 1000, limited, random.Random(seed)).target_size for seed in range(30)}
    assert wide == {(1024, 1024), (2048, 1024)}


def test_uncropped_image_is_resized_to_cover_its_bucket():
    plan = plan_image(1333, 1000, spec(resolution=1024, resolution_type="pixel"), random.Random(0))
    assert plan.target_size == (1344, 1024)
    assert plan.intermediate_size == (1365, 1024)
    assert plan.crop_offset == (0, 10)


def test_every_plan_is_consistent():
    rng = random.Random(1234)
    for _ in range(400):
        rules = spec(
            resolution=rng.choice([256, 512, 1024]), resolution_type=rng.choice(["pixel", "pixel_area"]),
            crop=rng.random() < 0.6, crop_style=rng.choice(["random", "center", "corner"]),
            crop_aspect=rng.choice(["square", "preserve", "closest", "random"]),
            crop_aspect_buckets=(0.5, 0.75, 1.0, 1.5), aspect_bucket_alignment=rng.choice([16, 64]),
            maximum_image_size=rng.choice([None, 1536]), target_downsample_size=1280)
        width, height = rng.randint(40, 5000), rng.randint(40, 5000)
        plan = plan_image(width, height, rules, rng)
        if isinstance(plan, SizeRejection):
            continue
        (iw, ih), (top, left), (tw, th) = plan.intermediate_size, plan.crop_offset, plan.target_size
        assert tw % rules.aspect_bucket_alignment == 0 and th % rules.aspect_bucket_alignment == 0
        assert 0 <= left and left + tw <= iw and 0 <= top and top + th <= ih
        # resizing keeps the aspect ratio, up to half a pixel of rounding per side
        assert abs(math.log((iw / ih) / (width / height))) <= 0.5 / iw + 0.5 / ih + 0.5 / width + 0.5 / height


def test_random_planning_detection():
    assert uses_random_planning(spec(crop=True, crop_style="random"))
    assert uses_random_planning(spec(crop=True, crop_style="center", crop_aspect="random"))
    assert not uses_random_planning(spec(crop=False, crop_style="random"))
    assert not uses_random_planning(spec(crop=True, crop_style="center"))
