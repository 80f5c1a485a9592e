"""Speed options keep the numerics: on-device augmentation (draws, crops, refusals), the device-side skip
of non-finite steps, regional compilation's state-dict keys, and `livt bench --tiny` end to end."""

import math

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from livt.config import AugConfig, ConfigError, OptimConfig
from livt.data.device import OnDevice, check_finetune_aug, resized_crops, rrc_boxes, uniforms
from livt.data.errors import DataError
from livt.data.splits import ArrayDataset
from livt.optim import build_optimizer


def test_draws_depend_on_seed_epoch_index_only():
    a = uniforms(0, 3, np.array([5, 9, 2]), 4)
    b = uniforms(0, 3, np.array([2, 7, 5, 9]), 4)  # another batch holding the same samples
    assert np.array_equal(a[0], b[2]) and np.array_equal(a[2], b[0]) and np.array_equal(a[1], b[3])
    assert not np.array_equal(a, uniforms(0, 4, np.array([5, 9, 2]), 4))  # the epoch changes them
    assert not np.array_equal(a, uniforms(1, 3, np.array([5, 9, 2]), 4))  # so does the seed
    u = uniforms(0, 0, np.arange(20000), 1)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003


def test_rrc_boxes_draw_torchvision_distribution():
    H, W, n = 375, 500, 4000
    boxes = rrc_boxes(uniforms(0, 0, np.arange(n), 22), H, W, (0.08, 1.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, H, W), (0.08, 1.0), (3 / 4, 4 / 3))
                    for _ in range(n)])
    for ours, theirs in ((h * w / (H * W), ref[:, 2] * ref[:, 3] / (H * W)),
                         (np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                         ((left + w / 2) / W, (ref[:, 1] + ref[:, 3] / 2) / W)):
        assert abs(ours.mean() - theirs.mean()) < 0.02 and abs(ours.std() - theirs.std()) < 0.02
    # a tall strip has no valid try at ratio >= 3/4 often: the fallback is the centred clamped crop
    top, left, h, w = rrc_boxes(np.full((1, 22), 0.999), 100, 10, (0.99, 1.0))[0]
    assert (h, w) == (13, 10) and top == (100 - 13) // 2 and left == 0


def test_resized_crop_matches_pil_and_flip_mirrors():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = np.array(Image.fromarray(small).resize((40, 40), Image.BICUBIC))  # smooth (40, 40, 3)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]  # (1, 3, 40, 40) uint8
    full = resized_crops(x, torch.tensor([[0, 0, 40, 40]]), torch.tensor([False]), 40)
    assert (full - x.float()).abs().max() < 1e-3  # the whole image at its own size is itself
    flipped = resized_crops(x, torch.tensor([[0, 0, 40, 40]]), torch.tensor([True]), 40)
    assert torch.allclose(flipped, x.float().flip(-1), atol=1e-3)
    box = (5, 8, 20, 24)  # top, left, h, w: upscaled to 32 x 32
    ours = resized_crops(x, torch.tensor([box]), torch.tensor([False]), 32)[0].permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC, box=(8, 5, 32, 25)), dtype=np.float64)
    psnr = 10 * math.log10(255**2 / np.mean((ours - pil) ** 2))
    assert psnr > 35, psnr  # the cubic kernels differ (a = -0.75 vs Pillow's -0.5), nothing else


def test_pad_crop_shifts_in_zeros():
    images = np.full((2, 8, 8, 3), 200, dtype=np.uint8)
    data = OnDevice(ArrayDataset(images, np.array([0, 1]), ["a", "b"], "t"), 8, (0, 0, 0), (1, 1, 1), 0, "cpu",
                    crop="pad", pad=2)
    out = resized_crops(data.images, torch.tensor([[-2, 1, 8, 8]]), torch.tensor([False]), 8, zero_outside=True)
    assert torch.allclose(out[0, :, :2], torch.zeros(3, 2, 8), atol=1e-3)  # two rows of padding on top
    assert torch.allclose(out[0, :, 2:, :7], torch.full((3, 6, 7), 200.0), atol=1e-3)
    assert torch.allclose(out[0, :, 2:, 7], torch.zeros(3, 6), atol=1e-3)  # one column on the right
    boxes, _ = data.boxes(0, np.arange(2))
    assert ((boxes[:, :2] >= -2) & (boxes[:, :2] <= 2)).all() and (boxes[:, 2:] == 8).all()
    batch = data.batch(0, np.arange(2)) / 255  # normalised with mean 0, std 1
    assert batch.shape == (2, 3, 8, 8) and batch.max() <= 200 / 255 + 1e-4 and batch.min() >= 0


def test_on_device_refusals_name_the_keys():
    with pytest.raises(ConfigError, match=r"aug.rand_augment 'rand-m9.*aug.reprob 0.25"):
        check_finetune_aug(AugConfig())
    check_finetune_aug(AugConfig(rand_augment="", reprob=0.0))  # crop + flip + mixup: fine

    class Files:
        name = "files"
    with pytest.raises(DataError, match="data.on_device: 'files' is not held in memory"):
        OnDevice(Files(), 8, (0, 0, 0), (1, 1, 1), 0, "cpu")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_found_inf_skips_the_update_entirely(name):
    """A step with found_inf = 1 (here the first, whose gradient is NaN) leaves weights, moments and step
    counts as if it never ran: the run equals one on the remaining batches only."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 4, generator=g) for _ in range(3)]

    def train(xs, skip_first):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.1), lr=0.1)
        for step, x in enumerate(xs):
            bad = skip_first and step == 0
            (model(x).square().sum() * (math.nan if bad else 1.0)).backward()
            opt.found_inf = torch.tensor(float(bad))
            opt.step()
            opt.zero_grad()
        return model, opt

    skipped, opt = train(batches, skip_first=True)
    reference, _ = train(batches[1:], skip_first=False)
    for a, b in zip(skipped.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    if name == "adamw":
        assert all(s["step"].item() == 2 for s in opt.state.values())


@pytest.fixture
def reset_accelerate():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_bench_tiny_runs_and_writes_tables(tmp_path, reset_accelerate):
    from livt.bench import main

    rows = main(["--tiny", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert {r["stage"] for r in rows} == {"pretrain", "finetune"}
    for stage in ("pretrain", "finetune"):
        mine = [r for r in rows if r["stage"] == stage]
        assert [(r["step"], r["input"]) for r in mine] == [
            ("reference", "model only"), ("reference", "on_device"), ("livt", "model only"), ("livt", "on_device"),
            ("none", "on_device (input alone)")]
        assert mine[0]["x_reference"] == 1.0 and all(r["images_per_s"] > 0 for r in mine)
        assert all(0 < r["mfu"] for r in mine if r["step"] != "none")
    text = (tmp_path / "bench.md").read_text()
    assert "measured matmul peak" in text and text.count("| reference | model only |") == 2
