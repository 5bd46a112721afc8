"""`tandem data shards`: folder / CSV / TSV / parquet -> img2dataset shards, read back by the real loader."""

import csv
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.pipeline import ShardStream, StreamSpec
from data.s3 import S3Settings
from data.writer import WriteOptions, folder_rows, input_rows, write_shards
from tests.conftest import tandem
from tests.test_s3 import CREDS, MotoServer
from training.errors import UserError


def _image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """11 inputs: 8 usable (JPEG, large JPEG, RGBA PNG, greyscale), 1 corrupt, 1 truncated, 1 without caption."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    for i in range(6):
        _image(i, (48 + i, 40)).save(folder / f"img{i:02d}.jpg", quality=90)
    _image(6, (300, 120)).save(folder / "sub" / "big.jpg", quality=90)
    _image(7, (32, 32), "RGBA").save(folder / "sub" / "alpha.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    whole = (folder / "img00.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    _image(8, (20, 20)).save(folder / "nocaption.jpg")
    for path in folder.rglob("*.*"):
        if path.name != "nocaption.jpg" and path.suffix != ".txt":
            path.with_suffix(".txt").write_text(f"a picture called {path.stem}\n")
    return folder


def read_back(urls: list[str], s3: S3Settings = S3Settings()) -> list[tuple[str, str, tuple]]:
    """(key, caption, decoded size) of every sample, through Tandem's own loader."""
    spec = StreamSpec(urls=urls, batch_size=4, train=False, s3=s3)
    stream = ShardStream(spec, lambda image: torch.tensor(image.size), lambda texts: texts, image_size=None)
    return [(k, c, tuple(s.tolist())) for b in stream for k, c, s in zip(b["key"], b["caption"], b["image"])]


def written(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_folder_round_trip(images, tmp_path):
    out = tmp_path / "shards"
    totals = write_shards(folder_rows(images), str(out), WriteOptions(samples_per_shard=4, max_size=100))
    failures = totals.pop("failures")
    assert totals == {"shards": 3, "count": 11, "successes": 8, "failed": 3, "resumed": 0}
    assert failures.pop("missing caption") == 1 and sorted(failures.values()) == [1, 1]  # corrupt, truncated
    assert any("truncated" in reason for reason in failures), failures
    assert set(written(out)) == {"00000.tar", "00001.tar", "00002.tar", "00000_stats.json", "00001_stats.json",
                                 "00002_stats.json", "sizes.json", "stats.json"}
    sizes = json.loads((out / "sizes.json").read_text())
    samples = read_back([str(out / name) for name in sorted(sizes)])
    assert sum(sizes.values()) == len(samples) == 8
    # sorted inputs: broken, cut, img00..05, nocaption | sub/alpha, sub/big; keys are shard + index in shard
    names = [p.stem for p in sorted(p for p in images.rglob("*") if p.suffix in (".jpg", ".png"))]
    expected = [(f"{i // 4:05d}{i % 4}", f"a picture called {n}") for i, n in enumerate(names)
                if n not in ("broken", "cut", "nocaption")]
    assert [(k, c) for k, c, _ in samples] == expected
    decoded = {c.split()[-1]: size for _, c, size in samples}
    assert decoded["img03"] == (51, 40) and decoded["alpha"] == (32, 32) and decoded["big"] == (100, 40)
    for url in [str(out / "00000.tar")]:  # unchanged JPEGs are stored byte for byte
        with tarfile.open(url) as tar:
            assert tar.extractfile("000002.jpg").read() == (images / "img00.jpg").read_bytes()
    metas = [s["json"] for s in wds.WebDataset(str(out / "00002.tar"), shardshuffle=False).decode()]
    meta = metas[-1]
    assert meta["filepath"] == "sub/big.jpg" and meta["original_width"] == 300 and meta["width"] == 100
    assert json.loads((out / "00000_stats.json").read_text())["failed"] == 2


def test_tables_give_the_same_samples(images, tmp_path):
    rows = [(str(p.relative_to(images)), p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists()
             else "") for p in sorted(images.glob("img*.jpg"))]
    with (images / "list.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption", "source"), *[(p, c, "web") for p, c in rows]])
    with (images / "list.tsv").open("w", newline="") as f:
        csv.writer(f, delimiter=";").writerows([("image", "title"), *rows])
    pq.write_table(pa.table({"filepath": [str(images / p) for p, _ in rows], "caption": [c for _, c in rows]}),
                   images / "list.parquet")
    results = []
    for source, kwargs in (("list.csv", {}), ("list.tsv", {"image_key": "image", "caption_key": "title",
                                                            "separator": ";"}), ("list.parquet", {})):
        out = tmp_path / source
        write_shards(input_rows(str(images / source), **kwargs), str(out), WriteOptions(samples_per_shard=4))
        results.append(read_back(sorted(str(p) for p in out.glob("*.tar"))))
    assert results[0] == results[1] == results[2] and len(results[0]) == 6
    assert [c for _, c, _ in results[0]] == [c for _, c in rows]
    meta = next(iter(wds.WebDataset(str(tmp_path / "list.csv" / "00000.tar"), shardshuffle=False).decode()))["json"]
    assert meta["source"] == "web" and meta["filepath"] == "img00.jpg"


def test_interrupted_writing_resumes_to_identical_output(images, tmp_path):
    rows, options = folder_rows(images), WriteOptions(samples_per_shard=4)
    write_shards(rows, str(tmp_path / "whole"), options)
    done = []

    def interrupt(n: int) -> None:
        done.append(n)
        if len(done) == 6:  # in the middle of the second shard
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(rows, str(tmp_path / "parts"), options, progress=interrupt)
    assert set(written(tmp_path / "parts")) == {"00000.tar", "00000_stats.json"}  # no partial shard, no tmp
    first = (tmp_path / "parts" / "00000.tar").stat().st_mtime_ns
    totals = write_shards(rows, str(tmp_path / "parts"), options)
    assert totals["resumed"] == 1 and (tmp_path / "parts" / "00000.tar").stat().st_mtime_ns == first
    assert written(tmp_path / "parts") == written(tmp_path / "whole")
    assert write_shards(rows, str(tmp_path / "parts"), options, workers=2)["resumed"] == 3
    write_shards(rows, str(tmp_path / "parallel"), options, workers=2)  # shards built in worker processes
    assert written(tmp_path / "parallel") == written(tmp_path / "whole")


def test_a_rerun_with_other_rows_or_options_rebuilds_and_never_mixes(images, tmp_path):
    rows, out = folder_rows(images), tmp_path / "out"

    def fresh(rows, options) -> dict[str, bytes]:
        folder = tmp_path / f"fresh{len(list(tmp_path.iterdir()))}"
        write_shards(rows, str(folder), options)
        return written(folder)

    write_shards(rows, str(out), WriteOptions(samples_per_shard=4))  # 3 shards
    assert write_shards(rows, str(out), WriteOptions(samples_per_shard=6))["resumed"] == 0  # 2 shards
    assert written(out) == fresh(rows, WriteOptions(samples_per_shard=6))  # 00002.tar of the first run is gone
    assert write_shards(rows, str(out), WriteOptions(samples_per_shard=6, quality=50))["resumed"] == 0
    assert written(out) == fresh(rows, WriteOptions(samples_per_shard=6, quality=50))
    changed = [replace(row, caption="another caption") if i == 7 else row for i, row in enumerate(rows)]
    assert write_shards(changed, str(out), WriteOptions(samples_per_shard=6, quality=50))["resumed"] == 1
    assert written(out) == fresh(changed, WriteOptions(samples_per_shard=6, quality=50))


def test_an_image_replaced_under_the_same_path_rebuilds_its_shard(images, tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(images, folder)
    options = WriteOptions(samples_per_shard=4)
    write_shards(folder_rows(folder), str(out), options)
    _image(99, (50, 40)).save(folder / "img03.jpg", quality=90)  # a new picture, same name and caption
    assert write_shards(folder_rows(folder), str(out), options)["resumed"] == 2  # the other two shards
    write_shards(folder_rows(folder), str(tmp_path / "fresh"), options)
    assert written(out) == written(tmp_path / "fresh")


def test_a_rebuild_stopped_before_its_stats_leaves_no_stale_fingerprint(images, tmp_path):
    """A rerun with other options stopped between a shard's tar and its stats file must not leave the
    old stats beside the new tar: rerunning the first command would take that shard as complete."""
    rows, out = folder_rows(images), tmp_path / "out"
    first = WriteOptions(samples_per_shard=4)
    write_shards(rows, str(out), first)
    (out / "00000_stats.json.tmp").mkdir()  # the stats write fails, as on a full disk or a failed PUT
    with pytest.raises(UserError, match="00000_stats.json"):
        write_shards(rows, str(out), WriteOptions(samples_per_shard=4, max_size=16))
    (out / "00000_stats.json.tmp").rmdir()
    assert "00000_stats.json" not in written(out)  # the new tar stands alone: incomplete, rebuilt next time
    assert write_shards(rows, str(out), first)["resumed"] == 2
    write_shards(rows, str(tmp_path / "fresh"), first)
    assert written(out) == written(tmp_path / "fresh")


def test_an_image_replaced_while_its_shard_is_built_rebuilds_it_next_time(images, tmp_path):
    folder, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(images, folder)
    options = WriteOptions(samples_per_shard=4)
    rows = folder_rows(folder)

    def replace_first_image(n: int) -> None:  # called after each row of the first shard is read
        if not (tmp_path / "replaced").exists():
            (tmp_path / "replaced").touch()
            _image(99, (50, 40)).save(rows[0].path, quality=90)

    write_shards(rows, str(out), options, progress=replace_first_image)
    assert write_shards(folder_rows(folder), str(out), options)["resumed"] == 2  # shard 0 is rebuilt
    write_shards(folder_rows(folder), str(tmp_path / "fresh"), options)
    assert written(out) == written(tmp_path / "fresh")


def test_colour_key_transparency_captions_and_table_values(tmp_path):
    """tRNS transparency in RGB and L PNGs is flattened onto white like alpha; a caption's BOM is dropped
    and non-UTF-8 caption bytes are one line; parquet bytes are text and NaN is null in the .json, also
    inside list and struct cells."""
    folder = tmp_path / "in"
    folder.mkdir()
    for mode, colour in (("RGB", (0, 0, 0)), ("L", 0)):
        Image.new(mode, (8, 8), colour).save(folder / f"{mode}.png", transparency=colour)
        (folder / f"{mode}.txt").write_bytes(b"\xef\xbb\xbfa transparent square")
    write_shards(folder_rows(folder), str(tmp_path / "out"), WriteOptions())
    samples = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False).decode("pil"))
    assert [s["txt"] for s in samples] == ["a transparent square"] * 2
    assert all(s["jpg"].convert("RGB").getpixel((4, 4)) >= (250, 250, 250) for s in samples)
    (folder / "L.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError, match=r"L.txt is not UTF-8 text"):
        folder_rows(folder)

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"filepath": [str(folder / "RGB.png")], "caption": [b"a red square"],
                             "score": [float("nan")], "scores": [[1.5, float("nan")]],
                             "meta": [{"w": float("inf"), "tag": b"x"}]}), table)
    [row] = input_rows(str(table))
    extra = dict(row.extra)
    assert row.caption == "a red square" and extra["score"] is None
    assert extra["scores"] == [1.5, None] and extra["meta"] == {"w": None, "tag": "x"}
    json.loads(json.dumps(extra, allow_nan=False))


def test_table_mistakes_are_one_line_naming_the_line(images, tmp_path):
    image = str(images / "img00.jpg")
    (tmp_path / "comma.csv").write_text(f"filepath,caption\n{image},fine\n{image},a cat, on a mat\n")
    with pytest.raises(UserError, match=r"comma\.csv line 3 has 3 fields for 2 columns; quote fields that contain ','"):
        input_rows(str(tmp_path / "comma.csv"))
    (tmp_path / "latin.csv").write_bytes(f"filepath,caption\n{image},dog\n{image},caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.csv line 3 is not UTF-8 text"):
        input_rows(str(tmp_path / "latin.csv"))
    (tmp_path / "bom.csv").write_bytes(f"filepath,caption\n{image},a dog\n".encode("utf-8-sig"))
    (tmp_path / "tabs.csv").write_text(f"filepath\tcaption\n{image}\ta dog\n")
    assert input_rows(str(tmp_path / "bom.csv")) == input_rows(str(tmp_path / "tabs.csv"), separator="\\t")
    assert [row.caption for row in input_rows(str(tmp_path / "bom.csv"))] == ["a dog"]
    with pytest.raises(UserError, match="--csv-separator must be one character"):
        input_rows(str(tmp_path / "tabs.csv"), separator="ab")


def test_when_no_row_gives_a_sample_it_is_an_error_and_no_shard_is_left(images, tmp_path):
    rows = [row for row in folder_rows(images) if Path(row.path).stem in ("broken", "cut", "nocaption")]
    with pytest.raises(UserError, match=r"^none of the 3 input rows gave a sample, so no shard was written: "
                                        r'\{.*"missing caption": 1'):
        write_shards(rows, str(tmp_path / "out"), WriteOptions(samples_per_shard=2))
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_bad_input_is_one_line(images, tmp_path):
    (tmp_path / "bad.csv").write_text("path,text\nx.jpg,hello\n")
    (tmp_path / "comma.csv").write_text("filepath,caption\nx.jpg,a cat, on a mat\n")
    cases = [(["--input", str(tmp_path / "nope")], "input must be a folder or a .csv/.tsv/.parquet file"),
             (["--input", str(tmp_path / "nope.csv")], "input table not found"),
             (["--input", str(tmp_path / "bad.csv")], "has no column 'filepath' or 'caption'"),
             (["--input", str(tmp_path / "comma.csv")], "comma.csv line 2 has 3 fields for 2 columns")]
    for args, message in cases:
        proc = tandem("data", "shards", *args, "--out", str(tmp_path / "out"))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("tandem: error: ") and message in proc.stderr


def test_cli_writes_to_s3_and_names_a_missing_bucket(images, tmp_path):
    server = MotoServer()
    server.start()
    try:
        boto3.client("s3", endpoint_url=server.url, **{k.lower(): v for k, v in CREDS.items()
                                                        if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket="out")
        proc = tandem("data", "shards", "--input", str(images), "--out", "s3://out/laion/",
                      "--samples-per-shard", "4", "--s3-endpoint-url", server.url, env=CREDS)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "wrote 8 of 11 samples in 3 shards" in proc.stdout
        again = tandem("data", "shards", "--input", str(images), "--out", "s3://out/laion/",
                       "--samples-per-shard", "4", "--s3-endpoint-url", server.url, env=CREDS)
        assert again.returncode == 0 and "(3 shards already complete)" in again.stdout, again.stderr[-2000:]
        settings = S3Settings(endpoint_url=server.url, region="us-east-1", access_key_id="testing",
                              secret_access_key="testing")
        remote = read_back([f"s3://out/laion/{i:05d}.tar" for i in range(3)], settings)
        write_shards(folder_rows(images), str(tmp_path / "local"), WriteOptions(samples_per_shard=4))
        assert remote == read_back(sorted(str(p) for p in (tmp_path / "local").glob("*.tar")))
        # a rerun with other options rebuilds, and removes the shard beyond its count from the prefix too
        write_shards(folder_rows(images), "s3://out/laion", WriteOptions(samples_per_shard=6), settings=settings)
        listed = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing").list_objects_v2(Bucket="out", Prefix="laion/")
        assert sorted(item["Key"] for item in listed["Contents"]) == [
            f"laion/{name}" for name in ("00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json",
                                         "sizes.json", "stats.json")]
        proc = tandem("data", "shards", "--input", str(images), "--out", "s3://missing/x",
                      "--s3-endpoint-url", server.url, env=CREDS)
        assert proc.returncode == 2 and proc.stderr == "tandem: error: cannot write s3://missing/x: no such bucket\n"
    finally:
        server.stop()
