"""Tests for the procedural shapes dataset in data/synth.py."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import synth


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _read_metas(split_dir: Path) -> list[dict]:
    metas = []
    for shard in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    return metas


def _structure(caption: str, meta: dict) -> str:
    """Replaces the scene words by placeholders, leaving only the sentence structure."""
    text = caption.replace(meta["background"], "<BG>")
    text = re.sub(rf"\b{meta['color']}\b", "<C>", text)
    text = re.sub(rf"\b{meta['shape']}\b", "<S>", text)
    phrases = sorted(synth._WHERE[meta["position"]] + (meta["position"], "centered"), key=len)
    for phrase in reversed(phrases):  # longest first: "in the top left corner" before "top left"
        text = text.replace(phrase, "<P>")
    words = sorted({w for ws in synth._SIZE_WORDS.values() for w in ws}, key=len, reverse=True)
    text = re.sub(r"\b(" + "|".join(map(re.escape, words)) + r")(?![\w-])", "<Z>", text)
    return re.sub(r"\ban? ", "a ", text)


def test_deterministic_per_seed(tmp_path):
    kwargs = dict(train_samples=50, test_samples=20, samples_per_shard=16, image_size=32)
    synth.write_dataset(tmp_path / "a", seed=3, **kwargs)
    synth.write_dataset(tmp_path / "b", seed=3, **kwargs)
    synth.write_dataset(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (_tree_bytes(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".tar"))
    # Train and test come from different streams, so their first shards differ.
    assert a["train/shard-00000.tar"] != a["test/shard-00000.tar"]


def _check_shard(path: Path, count: int, class_set: set[str], image_size: int) -> list[str]:
    """Checks one shard's {key}.jpg/.txt/.json triples and returns its keys in order."""
    keys = []
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert len(members) == 3 * count
        for i in range(0, len(members), 3):
            key = members[i].name.split(".")[0]
            assert re.fullmatch(r"\d{9}", key)
            names = [m.name for m in members[i:i + 3]]
            assert names == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
            image = Image.open(io.BytesIO(tar.extractfile(members[i]).read()))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (image_size, image_size)
            caption = tar.extractfile(members[i + 1]).read().decode("utf-8")
            meta = json.load(tar.extractfile(members[i + 2]))
            assert meta["class"] in class_set
            assert meta["key"] == key and meta["caption"] == caption
            keys.append(key)
    return keys


def test_layout_and_metadata(tmp_path):
    summary = synth.write_dataset(tmp_path, train_samples=45, test_samples=10,
                                  samples_per_shard=20, image_size=40)
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes == {"classes": synth.class_names(), "templates": list(synth.TEMPLATES), "framing": "scene"}
    assert summary["classes"] == len(classes["classes"])
    for split, n, shards in (("train", 45, 3), ("test", 10, 1)):
        sizes = json.loads((tmp_path / split / "sizes.json").read_text())
        assert sum(sizes.values()) == n == summary[split]["samples"]
        assert sorted(sizes) == [f"shard-{i:05d}.tar" for i in range(shards)]
        assert [Path(p).name for p in summary[split]["shards"]] == sorted(sizes)
        keys = []
        for name, count in sizes.items():
            keys += _check_shard(tmp_path / split / name, count, set(classes["classes"]), 40)
        assert keys == [f"{i:09d}" for i in range(n)]
    assert not list(tmp_path.rglob("*.tmp"))


def test_rewrite_removes_stale_shards(tmp_path):
    kwargs = dict(test_samples=5, samples_per_shard=10, image_size=16)
    synth.write_dataset(tmp_path, train_samples=30, **kwargs)
    synth.write_dataset(tmp_path, train_samples=10, **kwargs)
    remaining = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert remaining == ["shard-00000.tar", "sizes.json"]


def test_classes_and_templates():
    names = synth.class_names()
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert names == synth.class_names()
    assert len(synth.SHAPES) >= 6 and len(synth.COLORS) >= 6
    assert 6 <= len(synth.TEMPLATES) <= 10
    assert all(t.count("{}") == 1 for t in synth.TEMPLATES)


def test_caption_variety_and_class_words():
    rng = random.Random(0)
    structures = set()
    for _ in range(500):
        _, caption, meta = synth.render_sample(rng, 32)
        words = re.findall(r"[\w-]+", caption)
        assert meta["color"] in words and meta["shape"] in words, caption
        assert meta["class"] == f"{meta['color']} {meta['shape']}"
        # Zero-shot prompts name one class, so captions must never mention another.
        vocabulary = set(synth.COLORS) | set(synth.SHAPES)
        assert set(words) & vocabulary == {meta["color"], meta["shape"]}, caption
        structures.add(_structure(caption, meta))
    assert len(structures) >= 8, structures


def test_every_class_in_train_split(tmp_path):
    synth.write_dataset(tmp_path, train_samples=3000, test_samples=1, image_size=16)
    counts = Counter(m["class"] for m in _read_metas(tmp_path / "train"))
    assert set(counts) == set(synth.class_names())
    assert max(counts.values()) - min(counts.values()) <= 1


def test_image_colour_matches_label():
    rng = random.Random(7)
    palette = np.array(list(synth.COLORS.values()), np.float32)
    for _ in range(40):
        image, _, meta = synth.render_sample(rng, 48)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        pixels = np.asarray(Image.open(buf), np.float32).reshape(-1, 3)
        # Backgrounds are near-grey, so strongly chromatic pixels belong to the shape.
        chroma = pixels.max(axis=1) - pixels.min(axis=1)
        shape_pixels = pixels[chroma > 70]
        assert len(shape_pixels) > 10, meta
        nearest = np.argmin(np.linalg.norm(palette - np.median(shape_pixels, axis=0), axis=1))
        assert list(synth.COLORS)[nearest] == meta["color"], meta


def _shape_fraction(image: Image.Image) -> float:
    pixels = np.asarray(image, np.float32).reshape(-1, 3)
    return float(((pixels.max(axis=1) - pixels.min(axis=1)) > 70).mean())


def test_object_framing_fills_the_frame_scene_framing_does_not():
    fractions = {}
    for framing, sizes in synth.FRAMINGS.items():
        rng, lo, hi = random.Random(3), min(s[0] for s in sizes.values()), max(s[1] for s in sizes.values())
        fractions[framing] = []
        for _ in range(60):
            image, _, meta = synth.render_sample(rng, 64, framing=framing)
            assert lo <= meta["scale"] <= hi and meta["size"] in sizes
            fractions[framing].append(_shape_fraction(image))
    # Scene shapes cover a few percent of the frame, object shapes over twice as much on average, and
    # even the smallest object-framed shape covers more than the median scene-framed one.
    assert np.mean(fractions["object"]) > 2 * np.mean(fractions["scene"])
    assert min(fractions["object"]) > np.median(fractions["scene"])


@pytest.mark.parametrize("kwargs", [
    dict(train_samples=0), dict(test_samples=-1), dict(samples_per_shard=0), dict(image_size=15),
    dict(framing="poster")])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        synth.write_dataset(tmp_path, **{"train_samples": 2, "test_samples": 2, **kwargs})
    assert not (tmp_path / "train").exists()


def test_render_sample_rejects_unknown_class():
    with pytest.raises(ValueError):
        synth.render_sample(random.Random(0), class_name="pink hexagon")
