"""The WebDataset loader: splitting, equal batches, skip-and-count, resume cursor, bad paths."""

import io
import json
import re
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.classes import load_classes
from data.pipeline import ShardStream, StreamSpec, decode_image, decode_sample, make_loader
from data.shards import check_sizes, count_samples, expand_shards
from data.writer import WriteOptions, encode_image
from training.errors import UserError

TRANSFORM = lambda image: torch.tensor(image.size)  # noqa: E731 - keeps batches tiny and exact
TOKENIZE = lambda texts: torch.tensor([len(t) for t in texts])  # noqa: E731


def shards(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def stream(urls, *, rank=0, world=1, workers=1, role=0, batch=8, train=True, cursors=None, seed=0, buffer=50):
    spec = StreamSpec(urls=urls, batch_size=batch, rank=rank, world=world, workers=workers, train=train,
                      role_offset=role, cursors=cursors or {}, seed=seed, shuffle_buffer=buffer)
    return ShardStream(spec, TRANSFORM, TOKENIZE, image_size=None)


def take(dataset, n):
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def test_brace_expansion_and_errors(synth_data, tmp_path):
    urls = expand_shards(f"{synth_data}/train/shard-{{00000..00003}}.tar")
    assert len(urls) == 4 and count_samples(urls) == 256
    assert len(expand_shards(f"{urls[0]}::{urls[1]}")) == 2
    with pytest.raises(UserError, match="shard not found: .*nope"):
        expand_shards(f"{tmp_path}/nope-{{0..3}}.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(UserError, match="shard is empty"):
        expand_shards(str(tmp_path / "empty.tar"))
    with pytest.raises(UserError, match="no shards"):
        expand_shards("")


def test_ranks_and_workers_read_disjoint_samples_and_equal_batches(synth_data):
    urls = shards(synth_data / "train")  # 4 shards of 64
    seen = Counter()
    for rank in range(2):
        for role in range(2):  # 4 slots: one shard each per epoch
            # without a shuffle buffer, the first 64 samples of a slot are exactly its epoch-0 shard
            for batch in take(stream(urls, rank=rank, world=2, workers=2, role=role, buffer=0), 8):
                seen.update(batch["key"])
    assert len(seen) == 256 and set(seen.values()) == {1}  # one epoch, each sample exactly once
    # fewer shards than slots: split by sample, still disjoint and complete
    seen.clear()
    for rank in range(3):
        for batch in stream(urls[:2], rank=rank, world=3, batch=2, train=False):
            seen.update(batch["key"])
    assert len(seen) == 128 and set(seen.values()) == {1}


def test_streams_are_endless_so_no_rank_waits(synth_data):
    urls = shards(synth_data / "train")[:1]
    batches = take(stream(urls, batch=32), 10)  # 64 samples, but 320 asked: epochs roll over
    assert all(len(b["key"]) == 32 for b in batches)


def test_same_seed_same_order_and_resume_cursor(synth_data):
    urls = shards(synth_data / "train")
    full = take(stream(urls, seed=3), 12)
    assert [b["key"] for b in full] == [b["key"] for b in take(stream(urls, seed=3), 12)]
    assert [b["key"] for b in full] != [b["key"] for b in take(stream(urls, seed=4), 12)]
    resumed = take(stream(urls, seed=3, cursors={0: full[4]["cursor"]}), 7)
    for a, b in zip(full[5:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_and_incomplete_samples_are_skipped_and_counted(synth_data, tmp_path, caplog):
    good = shards(synth_data / "test")[0]
    with tarfile.open(good) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})
    members[f"{keys[0]}.jpg"] = b"\xff\xd8 definitely not a jpeg"
    members[f"{keys[1]}.jpg"] = members[f"{keys[1]}.jpg"][:40]  # truncated JPEG
    del members[f"{keys[2]}.txt"]  # missing caption
    bad = tmp_path / "bad.tar"
    _tar_with(bad, members)
    batches = list(stream([str(bad)], batch=16, train=False))
    assert sum(len(b["key"]) for b in batches) == 61
    assert sum(b["skipped"] for b in batches) == 3
    assert "skipping sample" in caplog.text


def test_truncated_tar_keeps_what_it_can(synth_data, tmp_path):
    data = Path(shards(synth_data / "test")[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    batches = list(stream([str(cut), shards(synth_data / "test")[1]], batch=16, train=False))
    got = sum(len(b["key"]) for b in batches)
    assert 64 + 20 < got < 128  # the whole second shard and part of the first
    assert sum(b["skipped"] for b in batches) >= 1


def test_loader_with_workers_matches_direct_stream(synth_data):
    urls = shards(synth_data / "train")
    spec = StreamSpec(urls=urls, batch_size=8, workers=2, seed=5, shuffle_buffer=50)
    loader_keys = [b["key"] for _, b in zip(range(6), make_loader(spec, TRANSFORM, TOKENIZE, None))]
    direct = [take(stream(urls, workers=2, role=r, seed=5), 3) for r in range(2)]
    interleaved = [direct[i % 2][i // 2]["key"] for i in range(6)]
    assert loader_keys == interleaved  # workers hand batches back strictly round-robin


def test_decode_sample_and_classes(synth_data, tmp_path):
    classes, templates = load_classes(synth_data / "classes.json")
    assert len(classes) >= 30 and all(t.count("{}") == 1 for t in templates)
    with pytest.raises(Exception, match="no caption"):
        decode_sample({"jpg": b""}, None)
    bad = tmp_path / "classes.json"
    bad.write_text(json.dumps({"classes": ["a"]}))
    with pytest.raises(UserError, match="classes"):
        load_classes(bad)


def _with_garbage(synth_data: Path, folder: Path, bad: set[int]) -> list[str]:
    """Copies of the 4 train shards, those in ``bad`` replaced by bytes that are no tar."""
    urls = []
    for i, path in enumerate(shards(synth_data / "train")):
        target = folder / Path(path).name
        target.write_bytes(b"\x17 not a tar " * 100 if i in bad else Path(path).read_bytes())
        urls.append(str(target))
    return urls


def test_a_broken_shard_is_skipped_by_every_slot_and_only_all_broken_is_an_error(synth_data, tmp_path):
    urls = _with_garbage(synth_data, tmp_path, bad={2})
    for rank in range(2):  # 4 slots, one shard each per epoch: in 2 epochs some slot draws only the bad one
        for role in range(2):
            batches = take(stream(urls, rank=rank, world=2, workers=2, role=role, buffer=16), 16)
            assert all(len(b["key"]) == 8 for b in batches)
    everything_bad = _with_garbage(synth_data, tmp_path, bad={0, 1, 2, 3})
    with pytest.raises(UserError, match=r"^no samples could be read from any of the 4 shards"):
        take(stream(everything_bad, rank=1, world=2, workers=2, role=1), 1)
    # raised in a DataLoader worker, it reaches the caller as its one line, not the worker's traceback
    spec = StreamSpec(urls=everything_bad[:2], batch_size=8, workers=2)
    with pytest.raises(UserError) as raised:
        next(iter(make_loader(spec, TRANSFORM, TOKENIZE, None)))
    assert str(raised.value) == f"no samples could be read from any of the 2 shards ({', '.join(everything_bad[:2])})"


def test_resume_reads_only_the_current_epoch_and_continues_exactly(synth_data, monkeypatch):
    from data.shards import open_shard

    opened = []
    monkeypatch.setattr("data.pipeline.open_shard", lambda url, s3=None: opened.append(url) or open_shard(url, s3))
    urls = shards(synth_data / "train")  # 256 samples an epoch
    full = take(stream(urls, batch=16, buffer=32, seed=2), 104)  # 6.5 epochs
    assert full[99]["resume"]["sources"] == [[6, 64]]  # epoch 6, its first 64 samples taken
    opened.clear()
    resumed = take(stream(urls, batch=16, buffer=32, seed=2, cursors={0: full[99]["resume"]}), 4)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[100:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[100:]))
    assert len(opened) <= 4  # epoch 6's shards, not the 27 of the epochs before it
    # several sources mixed by weight: each resumes within its own epoch
    sources = {"urls": urls[:1], "more_sources": [urls[1:3]], "weights": [1.0, 3.0]}
    spec = StreamSpec(batch_size=8, shuffle_buffer=20, seed=5, **sources)
    full = take(ShardStream(spec, TRANSFORM, TOKENIZE, None), 60)
    for k in (7, 31, 44):
        again = StreamSpec(batch_size=8, shuffle_buffer=20, seed=5, cursors={0: full[k - 1]["resume"]}, **sources)
        assert [b["key"] for b in take(ShardStream(again, TRANSFORM, TOKENIZE, None), 60 - k)] == \
            [b["key"] for b in full[k:]]
    assert full[59]["resume"]["sources"][0][0] >= 2  # the small source went round more than once


def test_counts_come_from_sizes_or_stats_files_and_a_bad_sizes_file_is_one_line(synth_data, tmp_path):
    urls = []
    for i, path in enumerate(shards(synth_data / "train")[:2]):
        urls.append(str(tmp_path / f"{i:05d}.tar"))
        Path(urls[-1]).write_bytes(Path(path).read_bytes())
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 70, "successes": 60}))  # img2dataset's
    assert count_samples(urls) == 60 + 64  # the stats file where there is one, else the tar's headers
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 5, "00001.tar": 6}))
    assert count_samples(urls) == 11
    assert count_samples(["s3://bucket/a.tar", *urls]) is None  # not 0: unknown without reading it
    (tmp_path / "sizes.json").write_text('{"00000.tar": 5,\n}')
    for call in (count_samples, check_sizes):
        with pytest.raises(UserError, match=rf"^{tmp_path}/sizes\.json is not a valid sizes\.json \(Expecting"):
            call(urls)


def test_16_bit_greyscale_images_are_scaled_not_clipped_white():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    png = io.BytesIO()
    Image.fromarray(ramp).save(png, "PNG")
    assert Image.open(io.BytesIO(png.getvalue())).mode.startswith("I")
    loaded = np.asarray(decode_image(png.getvalue(), 64), dtype=float)
    written = np.asarray(Image.open(io.BytesIO(encode_image(png.getvalue(), WriteOptions())[0])), dtype=float)
    for pixels in (loaded, written):
        assert abs(pixels.mean() - 127.5) < 3 and pixels.min() < 5 and pixels.max() > 250


def _members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.timeout(300)  # the bug this guards against was an endless stream: fail, don't hang
def test_shards_without_a_usable_sample_are_one_line_not_an_endless_stream(synth_data, tmp_path, caplog):
    members = _members(shards(synth_data / "train")[0])
    no_captions = tmp_path / "no-captions.tar"  # jpg + json, no txt
    _tar_with(no_captions, {name: data for name, data in members.items() if not name.endswith(".txt")})
    with pytest.raises(UserError, match=rf"^no usable sample in an epoch of 64 read from 1 shard \({no_captions}\): "
                                        r"64 no caption \(\.txt\); every sample needs a \.txt caption"):
        take(stream([str(no_captions)]), 1)
    # `tar cf shard.tar *.jpg *.txt`: a key's files are not next to each other, so each is a sample alone
    by_extension = tmp_path / "by-extension.tar"
    _tar_with(by_extension, {name: members[name] for ext in ("jpg", "txt") for name in sorted(members)
                             if name.endswith(ext)})
    spec = StreamSpec(urls=[str(by_extension)], batch_size=8, workers=1)
    with pytest.raises(UserError) as raised:  # from a DataLoader worker: the one line, no traceback
        next(iter(make_loader(spec, TRANSFORM, TOKENIZE, None)))
    assert str(raised.value) == (
        f"no usable sample in an epoch of 128 read from 1 shard ({by_extension}): 64 no caption (.txt), 64 no image "
        "(.jpg, .jpeg, .png or .webp); a sample's image and caption must lie next to each other in the tar under "
        "one key (tar the files sorted by name, not by extension, or write the shards with `tandem data shards`)")
    # one shard of four unusable: a slot that draws only it in an epoch warns and reads on
    urls = [str(tmp_path / f"{i}.tar") for i in range(4)]
    for i, (url, source) in enumerate(zip(urls, shards(synth_data / "train"))):
        Path(url).write_bytes(no_captions.read_bytes() if i == 2 else Path(source).read_bytes())
    for rank in range(2):
        for role in range(2):
            batches = take(stream(urls, rank=rank, world=2, workers=2, role=role, buffer=16), 16)
            assert all(len(b["key"]) == 8 for b in batches)
    assert "other shards hold usable ones, so reading goes on" in caplog.text


def test_a_resume_does_not_count_again_the_skips_of_what_it_replays(synth_data, tmp_path):
    data = Path(shards(synth_data / "train")[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 700])  # a shard cut short: the rest of it is one counted skip
    urls = [str(cut), shards(synth_data / "train")[1]]
    full = take(stream(urls, buffer=0, seed=1), 24)
    assert sum(b["skipped"] for b in full) >= 2 and len({b["epoch"] for b in full}) == 2
    for k in range(len(full) - 1):
        resumed = take(stream(urls, buffer=0, seed=1, cursors={0: full[k]["resume"]}), len(full) - k - 1)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[k + 1:]]
        assert [b["skipped"] for b in resumed] == [b["skipped"] for b in full[k + 1:]], k


def test_a_resume_after_the_shuffle_buffer_or_the_shards_changed_starts_the_next_epoch(synth_data, caplog):
    from training.trainer import DataCursor

    urls = shards(synth_data / "train")  # 256 samples an epoch
    full = take(stream(urls, batch=16, buffer=32), 12)
    cursor = DataCursor(world=1, workers=1, seed=0)
    for batch in full[:8]:  # half of epoch 0 taken
        cursor.advance(batch)
    saved = cursor.state()

    def resumed(urls, buffer, n=16, strip_layout=False):
        again = DataCursor(world=1, workers=1, seed=0)
        again.restore(saved)
        positions = {role: {k: v for k, v in position.items() if not (strip_layout and k == "layout")}
                     for role, position in again.positions.items()}
        return take(stream(urls, batch=16, buffer=buffer, cursors=positions), n)

    assert [b["key"] for b in resumed(urls, 32, 4)] == [b["key"] for b in full[8:]]  # unchanged: exactly on
    for changed_urls, buffer, what in ((urls, 200, r"data\.shuffle_buffer \(32 -> 200\)"),
                                       (urls[::-1], 32, "the list of shards")):
        caplog.clear()
        batches = resumed(changed_urls, buffer)
        keys = Counter(k for b in batches for k in b["key"])
        assert {b["epoch"] for b in batches} == {1} and len(keys) == 256 and set(keys.values()) == {1}
        assert re.search(rf"{what} changed since the checkpoint: data resumes at the start of epoch 1", caplog.text)
    # a cursor saved before layouts were (no "layout"): taken as unchanged, as such resumes always were
    assert {b["epoch"] for b in resumed(urls, 200, 4, strip_layout=True)} == {0}


def _turned_jpeg(orientation: int) -> bytes:
    image = Image.new("RGB", (40, 20), "white")
    image.paste((200, 0, 0), (0, 0, 10, 20))  # a red band on the left, so a turn shows
    exif = image.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_exif_orientation_is_applied_as_the_shard_writer_applies_it():
    from PIL import ImageOps

    turned = _turned_jpeg(6)  # stored 40x20, shown turned a quarter: 20x40
    loaded = decode_image(turned, None)
    written = Image.open(io.BytesIO(encode_image(turned, WriteOptions())[0]))
    assert loaded.size == written.size == (20, 40)
    assert loaded.tobytes() == ImageOps.exif_transpose(Image.open(io.BytesIO(turned))).convert("RGB").tobytes()
    assert np.asarray(loaded)[:5].mean(axis=(0, 1))[1] < 100  # the red band is now at the top
    upright = decode_image(_turned_jpeg(1), None)  # the fast path: no copy, no turn
    assert upright.size == (40, 20)
    assert upright.tobytes() == Image.open(io.BytesIO(_turned_jpeg(1))).convert("RGB").tobytes()


def _tiff_with_bad_tag_type() -> bytes:
    """A TIFF whose StripOffsets entry claims type UNDEFINED: PIL raises TypeError, not an OSError."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "TIFF")
    data = bytearray(out.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 273:
            struct.pack_into("<H", data, at + 2, 7)
    with pytest.raises(TypeError):
        Image.open(io.BytesIO(bytes(data))).load()
    return bytes(data)


def test_any_error_decoding_or_transforming_an_image_skips_the_sample(synth_data, tmp_path):
    members = _members(shards(synth_data / "test")[0])
    keys = sorted({name.split(".")[0] for name in members})
    members[f"{keys[0]}.jpg"] = _tiff_with_bad_tag_type()
    odd = tmp_path / "odd.tar"
    _tar_with(odd, members)
    refused = decode_image(members[f"{keys[1]}.jpg"], None).tobytes()

    def transform(image):
        if image.tobytes() == refused:  # a transform that cannot take one image
            raise RuntimeError("size refused")
        return TRANSFORM(image)

    spec = StreamSpec(urls=[str(odd)], batch_size=16, workers=1, train=False)
    batches = list(make_loader(spec, transform, TOKENIZE, None))  # in a worker: a raise there would end the run
    skipped = sum(b["skipped"] for b in batches)
    assert skipped == 2 and sum(len(b["key"]) for b in batches) == 62
    assert keys[0] not in {k for b in batches for k in b["key"]}


def test_a_local_shard_gone_mid_run_is_one_line_naming_it(synth_data, tmp_path):
    urls = []
    for i, source in enumerate(shards(synth_data / "train")[:2]):
        urls.append(str(tmp_path / f"{i}.tar"))
        Path(urls[-1]).write_bytes(Path(source).read_bytes())
    urls = expand_shards(f"{tmp_path}/{{0..1}}.tar")
    Path(urls[1]).unlink()  # after the checks, before the loader reads it
    spec = StreamSpec(urls=urls, batch_size=8, workers=1, train=False)
    with pytest.raises(UserError) as raised:
        list(make_loader(spec, TRANSFORM, TOKENIZE, None))
    assert str(raised.value) == f"cannot read {urls[1]}: no such file or directory"


def _read_bytes_so_far() -> int:
    with open("/proc/self/io") as io_stats:
        return int(next(line for line in io_stats if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process read counter")
def test_counting_a_tar_reads_its_headers_not_its_data(tmp_path):
    blob = np.random.default_rng(0).bytes(4 << 20)
    big = tmp_path / "big.tar"
    _tar_with(big, {f"{i:03d}.{ext}": blob if ext == "jpg" else b"a caption"
                    for i in range(5) for ext in ("jpg", "txt")})
    before = _read_bytes_so_far()
    assert count_samples([str(big)]) == 5
    assert _read_bytes_so_far() - before < (2 << 20)  # the shard is 20 MiB
    with tarfile.open(tmp_path / "big.tar.gz", "w:gz") as tar:  # compressed ones are still counted
        tar.add(big, arcname="inner.tar")
        tar.add(big, arcname="inner2.tar")
    assert count_samples([str(tmp_path / "big.tar.gz")]) == 2


def test_shard_patterns_that_name_a_folder_or_a_glob_say_so_and_expand_home(synth_data, tmp_path, monkeypatch):
    folder = synth_data / "train"
    expected = rf"e\.g\. {folder}/shard-\{{00000\.\.00003\}}\.tar$"
    with pytest.raises(UserError, match=rf"^{folder} is a folder, not a shard; name its shards with a brace "
                                        rf"pattern, {expected}"):
        expand_shards(str(folder))
    with pytest.raises(UserError, match=rf"^{folder}/\*\.tar: globs \(\*, \?, \[\.\.\.\]\) in shard patterns are "
                                        rf"not expanded; name the shards with a brace pattern, {expected}"):
        expand_shards(f"{folder}/*.tar")
    monkeypatch.setenv("HOME", str(synth_data))
    assert expand_shards("~/train/shard-{00000..00001}.tar") == shards(folder)[:2]


def test_repeated_class_names_are_found_in_one_pass():
    from data.classes import repeated_names

    comparisons = 0

    class Name(str):  # counts the comparisons a duplicate check makes
        __hash__ = str.__hash__

        def __eq__(self, other):
            nonlocal comparisons
            comparisons += 1
            return str.__eq__(self, other)

    names = [Name(f"class {i}") for i in range(3000)] + [Name("class 7"), Name("class 11"), Name("class 7")]
    assert repeated_names(names) == ["class 11", "class 7"]
    assert comparisons < 100  # a list.count per name made 9 million
