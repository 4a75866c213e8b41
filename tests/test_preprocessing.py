"""transferlab.models.preprocessing: config arithmetic, evaluation batches, training augmentation."""

from __future__ import annotations

import json

import pytest
import torch

from transferlab.models.preprocessing import PreprocessConfig, TrainAugment, center_crop, eval_batch

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def small_cfg(**kw) -> PreprocessConfig:
    args = {"input_size": 32, "resize_size": 36, "interpolation": "bicubic", "mean": HALF, "std": HALF} | kw
    return PreprocessConfig(**args)


def test_from_crop_pct_timm_rule():
    cfg = PreprocessConfig.from_crop_pct(224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    assert (cfg.input_size, cfg.resize_size) == (224, 256)
    assert cfg.crop_pct == pytest.approx(0.875)
    assert PreprocessConfig.from_crop_pct(224, 0.9, "bilinear", HALF, HALF).resize_size == 248  # floor(248.9)
    assert PreprocessConfig.from_crop_pct(224, 1.0, "bilinear", HALF, HALF).resize_size == 224


def test_with_input_size_keeps_crop_fraction():
    cfg = PreprocessConfig.from_crop_pct(224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    big = cfg.with_input_size(384)
    assert (big.input_size, big.resize_size) == (384, 438)  # floor(384 / 0.875)
    assert big.crop_pct == pytest.approx(0.875, abs=0.003)
    small = cfg.with_input_size(64)
    assert (small.input_size, small.resize_size) == (64, 73)
    assert (big.interpolation, big.mean, big.std) == ("bicubic", IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("input_size, crop_pct", [(224, 0.875), (224, 0.9), (192, 0.85), (448, 0.904), (17, 0.68)])
def test_with_input_size_same_size_is_identity(input_size, crop_pct):
    cfg = PreprocessConfig.from_crop_pct(input_size, crop_pct, "bicubic", HALF, HALF)
    assert cfg.with_input_size(input_size) == cfg


def test_bad_interpolation_rejected():
    with pytest.raises(ValueError, match="interpolation"):
        small_cfg(interpolation="lanczos")


def test_dict_round_trip_through_json():
    cfg = PreprocessConfig.from_crop_pct(224, 0.95, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    d = cfg.to_dict()
    assert d["crop_pct"] == pytest.approx(224 / 235, abs=1e-4)
    assert d["resize_size"] == 235 and d["interpolation"] == "bilinear"
    back = PreprocessConfig.from_dict(json.loads(json.dumps(d)))  # lists, not tuples, after JSON
    assert back == cfg
    assert isinstance(back.mean, tuple) and back.mean == IMAGENET_MEAN


def test_center_crop_takes_the_middle():
    img = torch.arange(36 * 48, dtype=torch.int32).view(1, 36, 48).expand(3, 36, 48)
    out = center_crop(img, 32)
    assert out.shape == (3, 32, 32)
    assert out[0, 0, 0].item() == 2 * 48 + 8  # top = (36-32)//2, left = (48-32)//2


def test_eval_batch_shape_and_normalisation():
    cfg = small_cfg()
    white = torch.full((3, 36, 40), 255, dtype=torch.uint8)
    black = torch.zeros((3, 50, 36), dtype=torch.uint8)
    grey = torch.full((3, 36, 36), 51, dtype=torch.uint8)
    batch = eval_batch([white, black, grey], cfg)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.allclose(batch[0], torch.ones(3, 32, 32))
    assert torch.allclose(batch[1], -torch.ones(3, 32, 32))
    assert torch.allclose(batch[2], torch.full((3, 32, 32), (51 - 127.5) / 127.5))


def test_eval_batch_per_channel_mean_std():
    cfg = small_cfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    img = torch.zeros((3, 36, 36), dtype=torch.uint8)
    img[0], img[1], img[2] = 255, 128, 0
    batch = eval_batch([img], cfg)
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    assert batch[0, :, 5, 5].tolist() == pytest.approx(expected, abs=1e-5)


def noisy_images(n: int, h: int = 36, w: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(n)]


def test_train_augment_shape_and_range():
    aug = TrainAugment(small_cfg())
    torch.manual_seed(0)
    out = aug(noisy_images(4))
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.01 and out.max() <= 1.01
    assert out.std() > 0.2  # real pixels, not a constant


def test_train_augment_seeded():
    aug = TrainAugment(small_cfg())
    images = noisy_images(3)
    torch.manual_seed(7)
    a = aug(images)
    torch.manual_seed(7)
    b = aug(images)
    torch.manual_seed(8)
    c = aug(images)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # random crops differ from the deterministic evaluation crop
    assert not torch.allclose(a, eval_batch(images, small_cfg()))


def test_train_augment_flips_half_the_time():
    # scale 1 on a square image at input size: the crop is the whole image, so only the flip varies
    aug = TrainAugment(small_cfg(resize_size=32), scale=(1.0, 1.0))
    img = noisy_images(1, h=32, w=32)[0]
    plain = eval_batch([img], small_cfg(resize_size=32))[0]
    flipped = plain.flip(-1)
    seen = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = aug([img])[0]
        is_plain, is_flipped = torch.allclose(out, plain, atol=1e-4), torch.allclose(out, flipped, atol=1e-4)
        assert is_plain != is_flipped
        seen.append(is_flipped)
    assert 3 <= sum(seen) <= 17
