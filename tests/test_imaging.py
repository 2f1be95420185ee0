"""Unit tier: image files of every common kind become the RGB picture a person sees."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bad_image
from ddpm.errors import UserError
from ddpm.figures import save_triptych
from ddpm.imaging import load_image, save_image, signed_to_unit, unit_to_signed


def as_unit(x):
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) numpy in [0, 1]."""
    return signed_to_unit(x[0]).permute(1, 2, 0).numpy()


def test_range_converters_are_inverse():
    x = torch.linspace(-1, 1, 11)
    assert torch.allclose(signed_to_unit(x), torch.linspace(0, 1, 11))
    assert torch.allclose(unit_to_signed(signed_to_unit(x)), x, atol=1e-6)


def test_rgb_round_trip_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    x = load_image(str(tmp_path / "in.png"), 16)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    save_image(x, str(tmp_path / "out.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), pixels)


def test_non_square_images_are_centre_cropped(tmp_path):
    pixels = np.zeros((8, 24, 3), dtype=np.uint8)
    pixels[:, 8:16] = 255  # only the centre square is white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    assert np.allclose(as_unit(load_image(str(tmp_path / "wide.png"), 8)), 1.0)
    tall = np.ascontiguousarray(pixels.transpose(1, 0, 2))
    Image.fromarray(tall).save(tmp_path / "tall.png")
    assert np.allclose(as_unit(load_image(str(tmp_path / "tall.png"), 8)), 1.0)


def test_very_non_square_images_keep_their_centre(tmp_path):
    strip = np.zeros((5, 201, 3), dtype=np.uint8)
    strip[:, 98:103, 1] = 255  # a green 5x5 square in the exact middle of a 1:40 black strip
    Image.fromarray(strip).save(tmp_path / "strip.png")
    x = as_unit(load_image(str(tmp_path / "strip.png"), 5))
    assert np.allclose(x, [0.0, 1.0, 0.0], atol=1e-6)


def test_downscaling_is_antialiased(tmp_path):
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(checker[:, :, None], 3, axis=2)).save(tmp_path / "checker.png")
    x = as_unit(load_image(str(tmp_path / "checker.png"), 8))
    assert np.allclose(x, 0.5, atol=0.02)  # a fine checkerboard averages to grey, no aliasing


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    x = as_unit(load_image(str(tmp_path / "g.png"), 8))
    assert np.allclose(x, 128 / 255, atol=1e-6)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = as_unit(load_image(str(tmp_path / "g16.png"), 2))
    assert np.allclose(x[:, :, 0], values / 65535, atol=1e-4)
    assert np.allclose(x[:, :, 0], x[:, :, 2])


def test_rgba_is_composited_on_white_not_its_hidden_colour(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere ...
    rgba[:2, :, 3] = 0  # ... but the top half fully transparent
    rgba[2:, :, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    x = as_unit(load_image(str(tmp_path / "a.png"), 4))
    assert np.allclose(x[:2], 1.0)  # white background, not the hidden red
    assert np.allclose(x[2:], [1.0, 0.0, 0.0])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)  # index 0 blue, 1 green
    img.paste(1, (0, 2, 4, 4))
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    x = as_unit(load_image(str(tmp_path / "p.png"), 4))
    assert np.allclose(x[:2], 1.0)  # transparent blue -> white
    assert np.allclose(x[2:], [0.0, 1.0, 0.0])


def test_cmyk_is_converted(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red
    x = as_unit(load_image(str(tmp_path / "c.jpg"), 4))
    assert np.allclose(x, [1.0, 0.0, 0.0], atol=0.03)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # left half white, as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    x = as_unit(load_image(str(tmp_path / "r.jpg"), 4))  # displayed 4 wide, 8 tall; centre crop
    # turned clockwise, the stored left (white) half is on top; the centre square holds
    # two white rows above two black ones
    assert x[0].mean() > 0.9 and x[-1].mean() < 0.1


def test_small_images_are_enlarged_with_a_warning(tmp_path):
    Image.fromarray(np.full((4, 6, 3), 200, dtype=np.uint8)).save(tmp_path / "s.png")
    warnings = []
    x = load_image(str(tmp_path / "s.png"), 16, warn=warnings.append)
    assert x.shape == (1, 3, 16, 16) and np.allclose(as_unit(x), 200 / 255, atol=1e-5)
    assert len(warnings) == 1 and "6x4" in warnings[0] and "16x16" in warnings[0]


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "does not exist"), ("folder", "is a folder"), ("empty", "is empty"),
     ("not-an-image", "cannot be read as an image"), ("truncated", "cannot be read as an image")],
)
def test_bad_image_files_are_user_errors(tmp_path, kind, message):
    with pytest.raises(UserError, match=message):
        load_image(str(bad_image(tmp_path, kind)), 16)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px now counts as a bomb
    with pytest.raises(UserError, match="decompression bomb"):
        load_image(str(tmp_path / "big.png"), 16)


def test_triptych_is_about_1500_px_wide(tmp_path):
    images = [torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16), -torch.ones(1, 3, 16, 16)]
    path = tmp_path / "fig.png"
    save_triptych([(f"panel {i}", x) for i, x in enumerate(images)], str(path))
    width, height = Image.open(path).size
    assert 1400 <= width <= 1600 and height < width
