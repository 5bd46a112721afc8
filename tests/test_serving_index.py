"""``tandem index``: resumable chunks, the three FAISS kinds, filters inside the search, mmap."""

import json

import numpy as np
import pytest

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


def test_unfinished_index_of_other_shards_is_not_mixed_in(tiny_export, synth_data, test_shards, tmp_path):
    out = tmp_path / "idx"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "progress.json").write_text(json.dumps(
        {"model": str(tiny_export), "shards": ["/elsewhere.tar"], "dim": 128, "chunks": 1, "cursor": 9, "count": 9}))
    with pytest.raises(UserError, match="other shards or another model"):
        indexing.build_index(str(tiny_export), test_shards, out, device="cpu")


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
