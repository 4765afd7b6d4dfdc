"""Every op of every timm augmentation policy runs at the extremes of its magnitude, on RGB and greyscale.

timm's posterize ops reach 0 bits (or fewer under `mmax`) at an end of their range, which Pillow 11+
refuses; framework/data/augment.py keeps the policy's meaning (a black image). These tests build the
policies through the framework's own training transform, then force each op to fire at each extreme.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from framework.data.augment import augment_ops, posterize
from framework.data.loaders import Pipeline, create_train_transform
from framework.data.policies import policy_problem
from framework.recipe.schema import AugmentConfig, DataConfig

POLICIES = [
    # RandAugment: plain, increasing, magnitude noise (gaussian, and uniform for mstd > 100), mmax past 10
    "rand-m9-mstd0.5-inc1", "rand-m10-inc1", "rand-m0", "rand-m10", "rand-m9-n3-mstd101-inc1",
    "rand-m30-mmax30-inc1", "rand-m30-mmax30", "rand-m7-p0.8-tweights", "rand-m9-t3a", "rand-m9-mstd0.5-t3aw",
    # AugMix (its ops are the increasing ones)
    "augmix-m5-w4-d2", "augmix-m10-w3-d1-mstd0.5", "augmix-m0-b1",
    # AutoAugment's policies
    "v0", "v0r", "original", "originalr", "3a", "v0-mstd0.5",
]
MODES = {"RGB": 3, "L": 1}
# Sections timm skips or misreads without a word (issue 22): each is refused, naming the section
REFUSED = {
    "rand-m9-inc": "RandAugment section 'inc' needs a value (inc<0|1>, e.g. inc1)",
    "rand-m9-mstd": "RandAugment section 'mstd' needs a value",
    "rand-m9-zz": "unknown RandAugment section 'zz'; sections are m<int>, n<int>, p<float>, mstd<float>, mmax<int>, "
                  "inc<0|1>, t<weights|3a|3aw>",
    "rand-m9-inx1": "unknown RandAugment section 'inx1'",
    "rand-m9-tinc": "RandAugment op set 'tinc': choices are tweights, t3a, t3aw",
    "rand-m9-inc2": "RandAugment section 'inc2': '2' is not a value of inc<0|1>",
    "rand-m9.5": "RandAugment section 'm9.5': '9.5' is not a value of m<int>",
    "rand-m9-m5": "RandAugment section 'm' given twice",
    "rand--m9": "unknown RandAugment section ''",
    "augmix-m5-n2": "unknown AugMix section 'n2'; sections are m<int>, w<int>, d<int>, a<float>, b<0|1>, mstd<float>",
    "v0-m5": "unknown AutoAugment section 'm5'; sections are mstd<float>",
    "v1": "unknown policy 'v1'; expected rand-<sections> (RandAugment), augmix-<sections> (AugMix) or an AutoAugment",
    "randaugment-m9": "unknown policy 'randaugment'",
}


@pytest.mark.parametrize("policy", POLICIES)
def test_every_documented_policy_parses(policy):
    assert policy_problem(policy) is None


@pytest.mark.parametrize("policy", REFUSED)
def test_sections_timm_would_skip_are_named(policy):
    assert (policy_problem(policy) or "").startswith(REFUSED[policy])


def _transform(policy: str, in_chans: int):
    cfg = DataConfig(image_size=24, augment=AugmentConfig(auto_augment=policy))
    return create_train_transform(cfg, Pipeline((0.5,) * in_chans, (0.25,) * in_chans, "bilinear", 1.0))


def _image(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (30, 26, 3) if mode == "RGB" else (30, 26)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
def test_every_op_of_a_policy_runs_at_its_lowest_and_highest_magnitude(policy, mode):
    transform = _transform(policy, MODES[mode])
    ops = augment_ops(transform)
    assert ops, f"{policy}: no timm AugmentOp found in {transform}"
    img = _image(mode)
    for op in ops:
        top = op.magnitude_max or 10
        for magnitude in (0.0, top / 2, top):
            op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0.0
            out = op(img)
            assert (out.mode, out.size) == (img.mode, img.size), f"{op.name} at {magnitude}"
    for _ in range(5):  # the whole transform, with the ops pinned at their top: a tensor of the model's channels
        x = transform(img)
        assert tuple(x.shape) == (MODES[mode], 24, 24) and bool(x.isfinite().all())


@pytest.mark.parametrize("mode", MODES)
def test_posterize_to_zero_bits_is_black_and_keeps_the_other_levels(mode):
    from PIL import ImageOps

    img = _image(mode)
    for bits in (0, -8):  # PosterizeIncreasing at the top; past it under mmax
        out = posterize(img, bits)
        assert out.mode == img.mode and np.asarray(out).max() == 0
    assert posterize(img, 8) is img
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))


def test_the_top_magnitude_of_increasing_posterize_reaches_zero_bits():
    """What makes the fix necessary: timm asks for 0 bits at the top of `inc1`'s range."""
    op = next(op for op in augment_ops(_transform("rand-m10-inc1", 3)) if op.name == "PosterizeIncreasing")
    assert op.level_fn(10.0, op.hparams) == (0,)
