"""Image files <-> tensors in [-1, 1], and the one safe way to open an image file.

One pair of converters, named for their ranges:

    load_image(path, size) -> (1, 3, size, size) float32 in [-1, 1]
    save_image(x, path)    <- (1, 3, H, W) or (3, H, W) in [-1, 1]

and open_image(path), which every reader of a user's image files goes through: it
refuses a possible decompression bomb and names a file Pillow cannot read.

Every file becomes an RGB picture as a person sees it: the EXIF orientation
is applied, transparent pixels are laid on a white background, 16-bit
grayscale is scaled (not clipped), palette and CMYK images are converted.
Then the largest centred square is cut out and resized with antialiasing
(torchvision's ``center_crop`` and ``resize``).
"""

import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from .errors import UserError
from .files import atomic_write, check_readable_file

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on: white


def signed_to_unit(x):
    """[-1, 1] -> [0, 1]."""
    return (x + 1) / 2


def unit_to_signed(x):
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def load_image(path, size, warn=None):
    """Read an image file as a (1, 3, size, size) float32 tensor in [-1, 1].

    Raises UserError for a missing, empty, unreadable, truncated or
    oversized file. ``warn(message)`` is called when the picture is smaller
    than ``size`` and has to be enlarged.
    """
    rgb = _read_rgb(path)  # (H, W, 3) float32 in [0, 1]
    height, width = rgb.shape[:2]
    if min(height, width) < size and warn is not None:
        warn(f"{path} is only {width}x{height} px: enlarging it to {size}x{size} will look soft")
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = TF.center_crop(x, [min(height, width)] * 2)  # (1, 3, S, S), the largest centred square
    x = TF.resize(x, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)  # (1, 3, size, size)
    return unit_to_signed(x.clamp(0.0, 1.0)).contiguous()  # (1, 3, size, size) in [-1, 1]


@contextmanager
def open_image(path):
    """Open an image file with Pillow (a context manager), refusing anything that is not a safe, readable image.

    Raises UserError for a missing, empty or unreadable file, for one that fails while the block
    decodes it (a truncated file), and for one that declares more pixels than Pillow allows: a
    possible decompression bomb, a small file that would unpack to gigabytes. Pillow only warns
    between Image.MAX_IMAGE_PIXELS and twice that; here the warning is the refusal it should be.
    """
    check_readable_file(path, "image", "check --image_path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"image {path!r} declares more than {Image.MAX_IMAGE_PIXELS:,} pixels; "
            "refusing it as a possible decompression bomb"
        ) from None
    except UserError:
        raise
    except Exception as exc:  # Pillow raises many kinds here: OSError, SyntaxError, ValueError, struct.error
        raise UserError(f"image {path!r} cannot be read as an image ({exc})") from None


def _read_rgb(path):
    """Decode an image file into an (H, W, 3) float32 array in [0, 1], or raise UserError."""
    with open_image(path) as img:
        img.load()  # decode now, so a truncated file fails here
        img = ImageOps.exif_transpose(img)  # turn phone photos upright
        return _to_rgb_array(img)


def _to_rgb_array(img):
    """Pillow image of any mode -> (H, W, 3) float32 in [0, 1]."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return rgb


def to_pil(x):
    """(1, 3, H, W) or (3, H, W) tensor in [-1, 1] -> 8-bit RGB Pillow image."""
    x = x.detach().float().cpu().reshape(-1, *x.shape[-2:])  # (3, H, W)
    pixels = (signed_to_unit(x.clamp(-1, 1)) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")


def save_image(x, path):
    """Write a tensor in [-1, 1] as an 8-bit RGB PNG (atomically)."""
    with atomic_write(path, "image") as tmp:
        to_pil(x).save(tmp, format="PNG")
