"""Decoded images made ready for RGB: high-bit-depth ones scaled to 8 bits, turned ones set upright.

PIL's ``convert("RGB")`` clips high-bit-depth pixels (16-bit greyscale PNG, 32-bit integer or float
TIFF) at 255 instead of scaling them, so a 16-bit image comes out almost all white in both the loader
and the shard writer. A camera's JPEG often stores its pixels sideways with an EXIF orientation tag;
``tandem data shards`` applies it when it writes a shard, and the loader (``upright``) when it reads
one whose images kept the tag (written by another tool), so every shard shows the picture upright.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ORIENTATION = 0x0112  # the EXIF tag; 1 is upright, 2-8 a flip or a turn


def to_8bit(image: Image.Image) -> Image.Image:
    """An ``L`` image for the modes above (their values scaled to 0-255), else ``image`` itself.

    16-bit modes span 0-65535. A 32-bit integer image is taken as 16-bit when a value exceeds 255 (a
    16-bit PNG opens as ``I`` in some PIL versions), else as 8-bit; a float image as 0-1 when no value
    exceeds 1, else as 0-255.
    """
    if image.mode not in HIGH_BIT_MODES:
        return image
    pixels = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.size and pixels.max() > 255):
        pixels = pixels / 257.0  # 65535 -> 255
    elif image.mode == "F" and pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    out = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    out.info = dict(image.info)  # keeps the EXIF orientation for exif_transpose (``upright``)
    return out


def upright(image: Image.Image) -> Image.Image:
    """``image`` flipped or turned as its EXIF orientation says, else ``image`` itself.

    Reading the tag costs microseconds; ``exif_transpose`` copies the pixels (even of an upright
    image), so only an image that needs turning pays for it.
    """
    if image.getexif().get(ORIENTATION, 1) not in range(2, 9):
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as the model sees it, the same in the loader and the server: 8 bits, upright,
    RGB (``convert`` only when the mode is another: it would copy an RGB image)."""
    image = upright(to_8bit(image))
    return image if image.mode == "RGB" else image.convert("RGB")
