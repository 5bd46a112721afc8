"""Procedural image-caption dataset for training and zero-shot evaluating a tiny CLIP.

Each scene is one coloured shape on a muted background. The class is the
"colour shape" pair, so a model that learns the captions can be evaluated
zero-shot with ``TEMPLATES`` x ``class_names()``. Output is WebDataset tar shards
in the img2dataset layout (``{key}.jpg/.txt/.json``) plus open_clip's
``sizes.json``.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.files import add_tar_member, atomic_write
from data.framings import FRAMINGS

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

# Saturated and pairwise far apart (>= ~90 in RGB) so jitter never blurs two classes.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40),
    "green": (40, 170, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (140, 55, 185),
    "orange": (245, 125, 25),
}

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a rendering of a {}.",
    "a drawing of the {}.", "a {} on a plain background.", "a simple {} shape.", "the {}.")

# Low-chroma (start, end) colours: the shape's hue must stay the only salient colour.
_BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "grey": ((128, 128, 128), (128, 128, 128)),
    "light grey": ((190, 190, 190), (190, 190, 190)),
    "dark grey": ((60, 60, 60), (60, 60, 60)),
    "beige": ((185, 175, 150), (185, 175, 150)),
    "slate": ((95, 105, 120), (95, 105, 120)),
    "grey gradient": ((70, 70, 75), (185, 185, 180)),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"), "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big")}
_POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right",
    "bottom left", "bottom", "bottom right")
_WHERE: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
# Distinct sentence structures; colour and shape appear in every one verbatim.
_CAPTION_STYLES: tuple[str, ...] = (
    "a {size} {color} {shape} {where}.",
    "there is a {size} {color} {shape} on a {bg} background.",
    "{color} {shape}, {pos}",
    "a drawing of a {color} {shape} {where}.",
    "a {color} {shape} on a {bg} background.",
    "a photo of a {size} {color} {shape}.",
    "{where}, a {color} {shape}.",
    "a {color} {shape}.",
    "an image showing a {size} {color} {shape} {where} on a {bg} background.",
    "{size} {color} {shape}",
    "the {shape} is {color} and sits {where}.",
    "a simple {color} {shape}, {size}, against a {bg} backdrop.",
)
_ROTATION_DEG = 12.0  # small enough that a square never looks like a diamond
_SUPERSAMPLE = 4
_JPEG_QUALITY = 90


def class_names() -> list[str]:
    """Returns every "colour shape" class in a fixed, colour-major order."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at the origin, within about unit radius, y down."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "diamond":
        # Narrower than tall so it differs from a rotated square in outline, not just angle.
        return [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]
    if shape == "cross":
        a, t = 0.95, 0.3
        return [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t),
                (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]
    # Triangle and star are regular polygons pointing up; the star alternates two radii.
    points, radii = (3, (1.0,)) if shape == "triangle" else (10, (1.0, 0.45))
    angles = [-math.pi / 2 + 2 * math.pi * i / points for i in range(points)]
    return [(radii[i % len(radii)] * math.cos(a), radii[i % len(radii)] * math.sin(a))
            for i, a in enumerate(angles)]


def _shape_mask(shape: str, size: int, cx: float, cy: float, scale: float,
                rotation: float) -> Image.Image:
    """Draws the shape at 4x and box-downsamples, which antialiases the edges."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    r, x0, y0 = scale * big, cx * big, cy * big
    if shape == "circle":
        draw.ellipse([x0 - 0.9 * r, y0 - 0.9 * r, x0 + 0.9 * r, y0 + 0.9 * r], fill=255)
    else:
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        draw.polygon([(x0 + r * (x * c - y * s), y0 + r * (x * s + y * c))
                      for x, y in _unit_polygon(shape)], fill=255)
    return mask.reduce(_SUPERSAMPLE)


def _place(rng: random.Random, position: str, scale: float) -> tuple[float, float]:
    """Picks a jittered centre inside the 3x3 cell named by ``position``."""
    row, col = divmod(_POSITIONS.index(position), 3)
    # Large shapes get a tighter grid so they stay inside the frame.
    lo = scale + 0.04
    span = 1.0 - 2 * lo
    jitter = 0.08 * span
    cx = lo + col * span / 2 + rng.uniform(-jitter, jitter)
    cy = lo + row * span / 2 + rng.uniform(-jitter, jitter)
    return min(max(cx, lo), 1 - lo), min(max(cy, lo), 1 - lo)


def _compose(rng: random.Random, mask: Image.Image, rgb: tuple[int, int, int],
             background: str) -> tuple[Image.Image, float]:
    """Blends the shape colour over the background through ``mask`` and adds noise."""
    size = mask.size[0]
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    shift = rng.randint(-8, 8)  # brightness jitter only, so the background stays grey-ish
    start, end = (np.array(c, np.float32) + shift for c in _BACKGROUNDS[background])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = ramp[::-1] if rng.random() < 0.5 else ramp
    ramp = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    bg = start + (end - start) * ramp
    color = np.array(rgb, np.float32) + [rng.uniform(-10, 10) for _ in range(3)]
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    pixels = bg * (1.0 - alpha) + color * alpha
    sigma = rng.uniform(1.0, 6.0)
    pixels = pixels + noise_rng.standard_normal(pixels.shape, dtype=np.float32) * sigma
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    return image, sigma


def _caption(rng: random.Random, color: str, shape: str, size: str, position: str,
             background: str) -> tuple[str, int]:
    """Describes the scene with a randomly chosen sentence structure."""
    style = rng.randrange(len(_CAPTION_STYLES))
    text = _CAPTION_STYLES[style].format(
        color=color, shape=shape, size=rng.choice(_SIZE_WORDS[size]),
        where=rng.choice(_WHERE[position]), bg=background,
        pos="centered" if position == "center" else position)
    return re.sub(r"\ba (?=[aeiou])", "an ", text), style


def render_sample(rng: random.Random, image_size: int = 64, *, class_name: str | None = None,
                  framing: str = "scene") -> tuple[Image.Image, str, dict]:
    """Renders one random scene.

    Args:
        rng: Source of all randomness, so a seeded ``rng`` reproduces the sample.
        image_size: Side of the square output image in pixels.
        class_name: Forces the "colour shape" class; drawn uniformly when None.
        framing: ``"scene"`` (small shapes anywhere) or ``"object"`` (large shapes): see ``FRAMINGS``.

    Returns:
        The RGB image, its caption and a metadata dict (class, shape, color, size,
        position, background, caption and the continuous scene parameters).
    """
    class_name = class_name or rng.choice(class_names())
    color, _, shape = class_name.partition(" ")
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown class {class_name!r}")
    sizes = FRAMINGS[framing]
    size = rng.choice(tuple(sizes))
    position, background = rng.choice(_POSITIONS), rng.choice(tuple(_BACKGROUNDS))
    scale = rng.uniform(*sizes[size])
    rotation = 0.0 if shape == "circle" else rng.uniform(-_ROTATION_DEG, _ROTATION_DEG)
    cx, cy = _place(rng, position, scale)
    mask = _shape_mask(shape, image_size, cx, cy, scale, rotation)
    image, sigma = _compose(rng, mask, COLORS[color], background)
    caption, style = _caption(rng, color, shape, size, position, background)
    meta = {"class": class_name, "shape": shape, "color": color, "size": size,
            "position": position, "background": background, "caption": caption,
            "caption_style": style, "center": [round(cx, 4), round(cy, 4)],
            "scale": round(scale, 4), "rotation": round(rotation, 2),
            "noise_std": round(sigma, 3), "width": image_size, "height": image_size}
    return image, caption, meta


def _shard_bytes(rng: random.Random, labels: list[str], first_key: int, image_size: int,
                 framing: str) -> bytes:
    """Renders ``labels`` into one in-memory tar; keys count up from ``first_key``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, label in enumerate(labels):
            key = f"{first_key + offset:09d}"
            image, caption, meta = render_sample(rng, image_size, class_name=label, framing=framing)
            jpg = io.BytesIO()
            # 4:4:4 chroma keeps the colour (half the label) crisp at tiny sizes.
            image.save(jpg, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
            meta = {"key": key, "status": "success", **meta}
            add_tar_member(tar, f"{key}.jpg", jpg.getvalue())
            add_tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
            add_tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    return buf.getvalue()


def _balanced_labels(rng: random.Random, n: int) -> list[str]:
    """Shuffled rounds over all classes, so counts differ by at most one."""
    labels: list[str] = []
    while len(labels) < n:
        block = class_names()
        rng.shuffle(block)
        labels.extend(block)
    return labels[:n]


def _write_split(split_dir: Path, n: int, rng: random.Random, per_shard: int,
                 image_size: int, framing: str) -> dict:
    """Writes one split's shards and sizes.json, removing stale shards of older runs."""
    split_dir.mkdir(parents=True, exist_ok=True)
    labels = _balanced_labels(rng, n)
    sizes: dict[str, int] = {}
    for index, start in enumerate(range(0, n, per_shard)):
        name = f"shard-{index:05d}.tar"
        chunk = labels[start:start + per_shard]
        atomic_write(split_dir / name, _shard_bytes(rng, chunk, start, image_size, framing))
        sizes[name] = len(chunk)
    # A previous, larger run would otherwise leave extra shards that globs pick up.
    for old in split_dir.glob("shard-*.tar*"):
        if old.name not in sizes:
            old.unlink()
    atomic_write(split_dir / "sizes.json", json.dumps(sizes, indent=2).encode("utf-8"))
    return {"samples": n, "shards": [str(split_dir / name) for name in sizes]}


def write_dataset(out: str | Path, train_samples: int = 20000, test_samples: int = 2000,
                  seed: int = 0, samples_per_shard: int = 1000, image_size: int = 64,
                  framing: str = "scene") -> dict:
    """Writes the train/test shards, their sizes.json files and classes.json.

    Each shard is written to ``name.tmp`` then renamed, so an interrupted run never
    leaves a truncated shard under its final name.

    Args:
        out: Output directory; created if missing.
        train_samples: Number of training samples.
        test_samples: Number of test samples.
        seed: Seed; train and test use independent streams derived from it.
        samples_per_shard: Samples per tar shard (the last one may be smaller).
        image_size: Side of the square images in pixels.
        framing: ``"scene"`` or ``"object"``: how much of the frame the shape fills (``FRAMINGS``).

    Returns:
        ``{"train": {"samples", "shards"}, "test": {...}, "classes": K}`` with shard paths.

    Raises:
        ValueError: If a count is not positive, ``image_size`` is below 16 or ``framing`` is unknown.
    """
    for name, value in (("train_samples", train_samples), ("test_samples", test_samples),
                        ("samples_per_shard", samples_per_shard)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"classes": len(class_names())}
    for split, n in (("train", train_samples), ("test", test_samples)):
        rng = random.Random(f"{seed}-{split}")
        summary[split] = _write_split(out / split, n, rng, samples_per_shard, image_size, framing)
    classes = {"classes": class_names(), "templates": list(TEMPLATES), "framing": framing}
    atomic_write(out / "classes.json", json.dumps(classes, indent=2).encode("utf-8"))
    return summary
