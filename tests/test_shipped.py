"""Shipped-assets tier: the files in the repository are the ones the README promises."""

import os
import re

import pytest
import torch
from PIL import Image

from conftest import REPO
from models import denoise, load_checkpoint, load_image, psnr

CHECKPOINT = os.path.join(REPO, "model_ckpt", "demo_unet.pth")
DEMO = os.path.join(REPO, "images", "demo.png")
RESULT = os.path.join(REPO, "images", "inference_result.png")
MAX_SHIPPED_BYTES = 20 * 1024 * 1024


def readme_psnr(readme):
    """The one-step PSNR figures the README quotes: (noisy input, output) in dB."""
    text = open(os.path.join(REPO, readme), encoding="utf-8").read()
    match = re.search(r"PSNR[^\n]*?([\d.]+) dB[^\n]*?([\d.]+) dB", text)
    assert match, f"{readme} quotes no PSNR figures"
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("path", [CHECKPOINT, DEMO, RESULT])
def test_shipped_files_exist_and_are_small(path):
    assert os.path.getsize(path) < MAX_SHIPPED_BYTES


def test_demo_image_is_256_px_rgb():
    image = Image.open(DEMO)
    assert image.size == (256, 256) and image.mode == "RGB"


def test_shipped_checkpoint_was_made_by_the_default_command():
    _, schedule, checkpoint = load_checkpoint(CHECKPOINT)
    args = checkpoint["train"]["args"]
    assert {k: args[k] for k in ("img_size", "batch_size", "train_steps", "lr", "image_path", "seed",
                                 "base_channels", "channel_mults")} == {
        "img_size": 256, "batch_size": 1, "train_steps": 3000, "lr": 1e-3, "image_path": "images/demo.png",
        "seed": 0, "base_channels": 16, "channel_mults": [1, 2, 4, 8]}
    assert checkpoint["train"]["step"] == 3000 and schedule.max_noise == 0.8


@pytest.fixture(scope="module")
def shipped_psnr():
    """PSNR of noisy input and one-step output at t = 500, seed 0: what ddpm_infer.py reports."""
    model, schedule, checkpoint = load_checkpoint(CHECKPOINT)
    x0 = load_image(DEMO, checkpoint["data"]["img_size"])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    x_t = schedule.add_noise(x0, t, eps)
    return psnr(x_t.clamp(-1, 1), x0), psnr(denoise(model, x_t, 500, schedule), x0)


def test_shipped_model_denoises_to_at_least_35_db(shipped_psnr):
    noisy, output = shipped_psnr
    assert noisy < 14 and output >= 35.0


@pytest.mark.parametrize("readme", ["README.md", "README.en.md"])
def test_readme_quotes_the_measured_psnr(shipped_psnr, readme):
    noisy, output = shipped_psnr
    quoted_noisy, quoted_output = readme_psnr(readme)
    assert quoted_noisy == pytest.approx(noisy, abs=0.01)
    assert quoted_output == pytest.approx(output, abs=0.01)


def test_result_figure_is_a_three_panel_png_about_1500_px_wide():
    image = Image.open(RESULT)
    assert image.format == "PNG" and 1400 <= image.width <= 1600 and image.height < image.width / 2
