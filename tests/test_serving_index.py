"""``tandem index``: resumable chunks, the three FAISS kinds, filters inside the search, mmap."""

import json

import faiss
import numpy as np
import pytest
import torch

from serving.engine import load_engine
from serving.index import Index
from tests.scripts.serving_fixtures import tiny_export, tiny_index  # noqa: F401 - fixtures
from training import indexing
from training.cli import shard_pattern
from training.errors import UserError


@pytest.fixture(scope="module")
def test_shards(synth_data) -> str:
    return shard_pattern(str(synth_data / "test"))


def test_interrupted_build_resumes_to_the_same_index(tiny_export, test_shards, tiny_index, tmp_path, monkeypatch):
    written = []
    real_write = indexing._write_chunk

    def crash_on_second(parts, number, embeddings, records):
        if number == 1 and "crashed" not in written:
            written.append("crashed")
            raise KeyboardInterrupt  # as if the job was killed between chunks
        written.append(number)
        real_write(parts, number, embeddings, records)

    monkeypatch.setattr(indexing, "_write_chunk", crash_on_second)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        indexing.build_index(str(tiny_export), test_shards, out, chunk_size=50, batch_size=25, device="cpu")
    progress = json.loads((out / "parts" / "progress.json").read_text())
    assert progress["chunks"] == 1 and progress["count"] == 50 and not (out / "index.json").exists()

    indexing.build_index(str(tiny_export), test_shards, out, chunk_size=50, batch_size=25, device="cpu")
    assert written == [0, "crashed", 1, 2]  # the resumed run embedded only what was missing
    resumed, full = Index(out), Index(tiny_index)
    assert resumed.count == full.count == 128 and not (out / "parts").exists()
    assert np.allclose(resumed.index.reconstruct_n(0, 128), full.index.reconstruct_n(0, 128), atol=1e-5)
    assert [resumed.record(i) for i in range(128)] == [full.record(i) for i in range(128)]
    with pytest.raises(UserError, match="already holds a finished index"):
        indexing.build_index(str(tiny_export), test_shards, out, device="cpu")


def crash_after_the_first_chunk(monkeypatch):
    """``_write_chunk`` writes chunk 0 and dies at chunk 1, as a build killed between chunks; returns
    the real one, to put back."""
    real_write = indexing._write_chunk

    def crash_after_first(parts, number, embeddings, records):
        if number == 1:
            raise KeyboardInterrupt
        real_write(parts, number, embeddings, records)

    monkeypatch.setattr(indexing, "_write_chunk", crash_after_first)
    return real_write


def test_an_unfinished_index_is_not_resumed_with_other_weights(tiny_export, test_shards, tmp_path, monkeypatch):
    """The same export folder re-written with other weights (a re-export in place) is another model:
    resuming would mix two models' embeddings in one index."""
    import shutil

    from safetensors.torch import load_file, save_file

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    real_write = crash_after_the_first_chunk(monkeypatch)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        indexing.build_index(str(export), test_shards, out, chunk_size=50, batch_size=25, device="cpu")
    monkeypatch.setattr(indexing, "_write_chunk", real_write)
    weights = load_file(export / "open_clip_model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
              export / "open_clip_model.safetensors")
    with pytest.raises(UserError, match=r"another model \(its weights_sha256 differ\); use another --out"):
        indexing.build_index(str(export), test_shards, out, chunk_size=50, batch_size=25, device="cpu")
    assert json.loads((out / "parts" / "progress.json").read_text())["chunks"] == 1  # left as it was
    summary = indexing.build_index(str(export), test_shards, out, chunk_size=50, batch_size=25, device="cpu",
                                   overwrite=True)
    manifest = json.loads((out / "index.json").read_text())
    assert summary["count"] == 128 and len(manifest["weights_sha256"]) == 64


def test_a_bf16_build_resumes_only_in_bf16(tiny_export, test_shards, tiny_index, tmp_path, monkeypatch):
    """--precision bf16 embeds as `tandem serve --precision bf16` does; a build resumes only at the
    precision it started with, so one index never mixes fp32 and bf16 embeddings."""
    real_write = crash_after_the_first_chunk(monkeypatch)
    out = tmp_path / "idx"
    options = dict(chunk_size=50, batch_size=25, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        indexing.build_index(str(tiny_export), test_shards, out, precision="bf16", **options)
    monkeypatch.setattr(indexing, "_write_chunk", real_write)
    with pytest.raises(UserError, match=r"another model \(its precision differ\)"):
        indexing.build_index(str(tiny_export), test_shards, out, **options)  # fp32, the default
    indexing.build_index(str(tiny_export), test_shards, out, precision="bf16", **options)
    assert json.loads((out / "index.json").read_text())["precision"] == "bf16"
    ours, fp32 = Index(out).index.reconstruct_n(0, 128), Index(tiny_index).index.reconstruct_n(0, 128)
    assert (ours * fp32).sum(-1).min() > 0.999 and not np.array_equal(ours, fp32)


def test_unfinished_index_of_other_shards_is_not_mixed_in(tiny_export, synth_data, test_shards, tmp_path):
    out = tmp_path / "idx"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "progress.json").write_text(json.dumps(
        {"model": str(tiny_export), "shards": ["/elsewhere.tar"], "dim": 128, "chunks": 1, "cursor": 9, "count": 9}))
    with pytest.raises(UserError, match=r"another model \(its shards, weights_sha256 differ\).*--overwrite"):
        indexing.build_index(str(tiny_export), test_shards, out, device="cpu")
    (out / "parts" / "chunk-00000.npy").write_bytes(b"stale")
    summary = indexing.build_index(str(tiny_export), test_shards, out, batch_size=64, device="cpu", overwrite=True)
    assert summary["count"] == 128 and Index(out).count == 128 and not (out / "parts").exists()


def test_cli_mistakes_are_one_line_and_leave_a_finished_index_as_it_was(tiny_export, test_shards, tiny_index,
                                                                         tmp_path, capsys):
    """A mistyped input to `tandem index --overwrite` is refused before anything is deleted; a wrong device,
    unreadable or unfitting weights, and an output path that is a file are one line each."""
    import shutil

    from training.cli import main

    out = tmp_path / "idx"
    shutil.copytree(tiny_index, out)
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    data = ["--data", test_shards]
    cases = [
        (["--model", str(tmp_path / "exprot"), *data], "is not an export directory"),
        (["--model", str(tiny_export), "--data", str(tmp_path / "nowhere")], "shard not found"),
        (["--model", str(tiny_export), *data, "--device", "bogus"], "unknown device 'bogus'"),
        (["--model", str(tiny_export), *data, "--device", "cuda:99"],
         "GPU(s)" if torch.cuda.is_available() else "CUDA is not available"),
        (["--model", "RN50", "--weights", str(junk), *data], "is not a readable safetensors file"),
        (["--model", "RN50", "--weights", str(tiny_export / "open_clip_model.safetensors"), *data],
         "do not fit model 'RN50'"),
        (["--model", str(tiny_export), "--data", "/x/{0..99999999999}.tar"], "names more than 5,000,000 shards"),
        (["--model", str(tiny_export), "--data", "/x/{{0..2999}{0..2999},y}.tar"], "names more than 5,000,000"),
    ] + [(["--model", str(tiny_export), *data, "--out", str(target)], f"--out {target}")
         for target in (a_file, a_file / "below")]
    for args, needle in cases:
        device = [] if "--device" in args else ["--device", "cpu"]
        target = [] if "--out" in args else ["--out", str(out)]
        assert main(["index", *args, *target, *device, "--overwrite"]) == 2, args
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("tandem: error: ") and needle in last, (args, last)
        assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before, args

    # The server's start-up check: a manifest that is not one, and a bogus device
    from serving.app import check_settings
    from serving.settings import ServeSettings

    (tmp_path / "bad").mkdir()
    for text, needle in (("not json", "not a readable index manifest"), ("{}", "no count, dim, kind")):
        (tmp_path / "bad" / "index.json").write_text(text)
        with pytest.raises(UserError, match=needle):
            check_settings(ServeSettings(model=str(tiny_export), index=str(tmp_path / "bad")))
    with pytest.raises(UserError, match="unknown device 'bogus'"):
        check_settings(ServeSettings(model=str(tiny_export), device="bogus"))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_filtered_search_equals_brute_force_over_the_matching_items(kind, tiny_export, test_shards, tiny_index,
                                                                    tmp_path):
    if kind == "flat":
        out = tiny_index
    else:
        out = tmp_path / kind
        summary = indexing.build_index(str(tiny_export), test_shards, out, kind=kind, batch_size=64, device="cpu")
        assert summary["kind"] == kind and summary["count"] == 128
    index = Index(out, nprobe=64, ef_search=256)
    assert index.mmapped
    vectors = Index(tiny_index).index.reconstruct_n(0, 128)
    records = [index.record(i) for i in range(index.count)]
    query = load_engine(str(tiny_export), device="cpu").encode_texts(["a red circle"]).numpy()
    for where in ({"color": "red"}, {"shape": ["star", "cross"], "size": "small"}, {"key": records[7]["key"]}):
        allowed = [i for i, r in enumerate(records)
                   if all(_matches(r, field, value) for field, value in where.items())]
        assert 0 < len(allowed) < 128
        expected = sorted(allowed, key=lambda i: -float(vectors[i] @ query[0]))[:5]
        hits = index.search(query, 5, where)[0]
        assert [i for i, _ in hits] == expected, where
        assert np.allclose([s for _, s in hits], [vectors[i] @ query[0] for i in expected], atol=1e-4)
    assert index.search(query, 5, {"color": "ultraviolet"}) == [[]]


def _matches(record: dict, field: str, value) -> bool:
    got = record.get(field) if field in ("key", "caption", "url") else record["meta"].get(field)
    return got in value if isinstance(value, list) else got == value


def _write_index(out, vectors: np.ndarray, records: list[dict], factory: str) -> None:
    """An index directory as ``tandem index`` writes one, from given vectors and metadata records."""
    out.mkdir()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(out / "index.faiss"))
    lines = [json.dumps(record).encode() + b"\n" for record in records]
    (out / "meta.jsonl").write_bytes(b"".join(lines))
    np.save(out / "meta.offsets.npy", np.cumsum([0] + [len(line) for line in lines]))
    (out / "index.json").write_text(json.dumps({"count": len(vectors), "dim": vectors.shape[1], "kind": factory}))


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW8"])
def test_a_selective_filter_still_gets_k_hits_from_an_approximate_index(factory, tmp_path, monkeypatch):
    from serving import index as index_module

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [indexing._record(f"{i:05d}", f"caption {i}", {"tag": "rare" if i % 100 == 0 else "common",
                                                              "decile": i % 10}) for i in range(4000)]
    _write_index(tmp_path / "idx", vectors, records, factory)
    index = Index(tmp_path / "idx", nprobe=1, ef_search=1)
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    rare = np.arange(0, 4000, 100)

    def brute_force(ids: np.ndarray, k: int) -> list[list[int]]:
        return [list(ids[np.argsort(-(vectors[ids] @ q), kind="stable")][:k]) for q in queries]

    for k in (10, 40, 100):  # 40 matching items: searched exactly, so the best min(k, 40) of them
        assert [[i for i, _ in hits] for hits in index.search(queries, k, {"tag": "rare"})] == brute_force(rare, k)
    # past the exact limit (and 3 vectors per exact batch), the FAISS search widens until each query has
    # its k hits, or until it would score as many items as match, and then they are scored exactly
    monkeypatch.setattr(index_module, "EXACT_IDS", 0)
    monkeypatch.setattr(index_module, "EXACT_BATCH", 3)
    exact_calls = []
    monkeypatch.setattr(index, "_exact", lambda *args: exact_calls.append(1) or Index._exact(index, *args))
    for where, matches in (({"decile": 3}, np.arange(3, 4000, 10)), ({"tag": "rare"}, rare)):
        for q, hits in zip(queries, index.search(queries, 10, where)):
            assert len(hits) == 10 and set(i for i, _ in hits) <= set(matches)
            assert np.allclose([s for _, s in hits], [vectors[i] @ q for i, _ in hits], atol=1e-4)
    # the 40 rare items: IVF's one list of 64 already holds ~63 items, HNSW reaches efSearch 64 after
    # three widenings (1, 4, 16), so both score the 40 exactly, in batches of 3: the true best 10
    assert exact_calls == [1]
    assert [[i for i, _ in hits] for hits in index.search(queries, 10, {"tag": "rare"})] == brute_force(rare, 10)


def test_urls_that_are_not_strings(tiny_export, tmp_path):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServeSettings

    assert indexing._record("k", "c", {"url": 123}) == {"key": "k", "caption": "c", "url": None, "meta": {"url": 123}}
    assert indexing._record("k", "c", {"url": "http://a"})["url"] == "http://a"
    # an index written before that fix holds whatever the sample's json had
    engine = load_engine(str(tiny_export), device="cpu")
    vectors = engine.encode_texts(["a", "b", "c", "d"]).numpy()
    bad = [123, ["http://a", "http://b"], "http://ok", {"x": 1}]
    _write_index(tmp_path / "old", vectors, [{"key": f"k{i}", "caption": 7 if i == 3 else "c", "url": url,
                                              "meta": {"url": url}} for i, url in enumerate(bad)], "Flat")
    settings = ServeSettings(model=str(tiny_export), device="cpu", api_token=None)
    with TestClient(create_app(settings, loaded=(engine, Index(tmp_path / "old")))) as client:
        response = client.post("/v1/search", json={"text": "a", "k": 4})
        assert response.status_code == 200, response.text
        by_key = {hit["key"]: hit for hit in response.json()["results"]}
        assert [by_key[f"k{i}"]["url"] for i in range(4)] == [None, None, "http://ok", None]
        assert by_key["k1"]["meta"]["url"] == ["http://a", "http://b"] and by_key["k3"]["caption"] is None
        assert client.post("/v1/search", json={"text": "a", "filter": {"url": 123}}).status_code == 200


def test_filter_fields_are_scanned_once_and_kept_within_bounds(tiny_index, monkeypatch):
    from serving import index as index_module

    index = Index(tiny_index)
    scans = []
    real_scan = index._scan
    monkeypatch.setattr(index, "_scan", lambda field: scans.append(field) or real_scan(field))
    query = index.vectors(np.arange(1))
    for i in range(20):  # a client inventing field names: no scan after the first, nothing kept
        assert index.search(query, 3, {f"no such field {i}": "x"}) == [[]]
    assert scans == ["no such field 0"] and len(index._postings) <= 1
    monkeypatch.setattr(index_module, "POSTINGS_FIELDS", 2)
    for field, value in [("color", "red"), ("shape", "star"), ("size", "small"), ("color", "red")]:
        hits = index.search(query, 3, {field: value})[0]
        assert len(hits) == 3 and all(index.record(i)["meta"][field] == value for i, _ in hits)
        assert len(index._postings) <= 2
    assert scans == ["no such field 0", "color", "shape", "size", "color"]
