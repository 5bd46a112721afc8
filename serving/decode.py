"""Request bytes -> model inputs: base64, image decoding with a pixel cap, the eval transform.

Images decode exactly as ``tandem eval`` and ``tandem index`` decode them (``data.pipeline.decode_image``:
JPEGs at the smallest DCT scale still >= the model's input side, then the shared ``data.modes.to_rgb``:
high-bit-depth images scaled to 8 bits, set upright by their EXIF orientation, RGB), so the server's
predictions and searches equal what evaluation measured and the index holds. That function cannot be imported here (``data.pipeline``
pulls in webdataset); a test checks the two agree, mode by mode.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from data.modes import to_rgb
from serving.errors import BadInput, TooLarge

SCALED_CROPS = 16  # under a low --max-pixels, an image scaled for the model may still be this many crops


def b64decode(text: str, what: str) -> bytes:
    """Standard base64, optionally as a ``data:image/...;base64,`` URL."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{what} is not valid base64") from None
    if not data:
        raise BadInput(f"{what} is empty")
    return data


def decode_image(data: bytes, size: int, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode to RGB; reject undecodable or truncated bytes (400) and images over ``max_pixels`` (413).

    The pixel cap is checked on the header's declared size, and on that size scaled for the model,
    before any pixel is decoded, so neither a decompression bomb nor a thin strip costs anything.
    """
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise TooLarge(f"{what} is {width}x{height} pixels, over the cap of {max_pixels}")
        # The eval transform scales the short side to the model's input side before its centre crop,
        # so a thin image (1 x 100,000 is a few hundred bytes) would grow to size x (size * 100,000).
        # Scaled, it may hold the cap's pixels, or 16 crops' worth under a cap lower than that.
        short, long = sorted((width, height))
        resized = size * math.ceil(size * long / max(short, 1))
        scaled_cap = max(max_pixels, SCALED_CROPS * size * size)
        if resized > scaled_cap:
            raise TooLarge(f"{what} is {width}x{height} pixels: scaled to {size} px on its short side for the "
                           f"model it would be {resized} pixels, over the cap of {scaled_cap}")
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        image.load()
        return to_rgb(image)  # convert("RGB") alone would clip a 16-bit PNG to near-white
    except TooLarge:
        raise
    except Image.DecompressionBombError as error:
        raise TooLarge(f"{what}: {error}") from None
    except UnidentifiedImageError:
        raise BadInput(f"{what} is not an image (no format PIL reads recognises it)") from None
    # PIL's format plugins raise a zoo of exception types on corrupt or truncated data; at this
    # boundary every one of them means "the client sent bytes that are not a usable image".
    except Exception as error:  # noqa: BLE001
        raise BadInput(f"{what} cannot be decoded as an image ({type(error).__name__}: {error})") from None


def image_tensor(data: bytes, transform: Callable, size: int, max_pixels: int, what: str = "image") -> torch.Tensor:
    """Bytes -> the model's ``[3, S, S]`` input through its eval transform."""
    image = decode_image(data, size, max_pixels, what)
    try:
        return transform(image)
    except Exception as error:  # noqa: BLE001 - same boundary as above, for odd modes and sizes
        raise BadInput(f"{what} cannot be preprocessed ({type(error).__name__}: {error})") from None
