"""Zero-shot top-1 and text->image recall of a test split, measured through the server's HTTP API.

The same numbers ``tandem eval`` reports, computed the way a client would: ``/v1/classify`` with the
split's classes and templates for every image, and ``/v1/search`` with every caption over an index of
the split (its paired image's rank among the hits). Used by tests/test_serving.py on a tiny model, and
by hand against a running server::

    uv run python -m tests.scripts.serving_agreement --url http://127.0.0.1:8000 \\
        --data /tmp/demo2/data/test --classes /tmp/demo2/data/classes.json
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECALL_AT = (1, 5, 10)


def read_samples(shards: list[Path]) -> list[dict]:
    """``key``, ``caption``, ``class`` and the JPEG bytes of every sample, in shard order."""
    samples: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                data = tar.extractfile(member).read()
                entry = samples.setdefault(f"{shard}/{key}", {"key": key})
                if ext == "jpg":
                    entry["jpg"] = data
                elif ext == "txt":
                    entry["caption"] = data.decode().strip()
                elif ext == "json":
                    entry["class"] = json.loads(data).get("class")
    return list(samples.values())


def _post(client, path: str, body: dict, headers: dict | None = None) -> dict:
    response = client.post(path, json=body, headers=headers or {})
    assert response.status_code == 200, (path, response.status_code, response.text[:500])
    return response.json()


def zero_shot(client, samples: list[dict], classes: list[str], templates: list[str], *, per_request: int = 16,
              concurrency: int = 1, headers: dict | None = None) -> tuple[float, list[str]]:
    """(top-1 accuracy, predicted label per sample) from ``/v1/classify``."""
    groups = [samples[i : i + per_request] for i in range(0, len(samples), per_request)]

    def ask(group: list[dict]) -> list[str]:
        images = [base64.b64encode(s["jpg"]).decode() for s in group]
        body = {"images": images, "labels": classes, "templates": templates, "top_k": 1}
        return [r["label"] for r in _post(client, "/v1/classify", body, headers)["results"]]

    with ThreadPoolExecutor(concurrency) as pool:
        predicted = [label for labels in pool.map(ask, groups) for label in labels]
    correct = sum(p == s["class"] for p, s in zip(predicted, samples))
    return correct / max(len(samples), 1), predicted


def text_to_image_recall(client, samples: list[dict], *, concurrency: int = 1,
                         headers: dict | None = None) -> dict[int, float]:
    """Fraction of captions whose own image is among the top k hits of ``/v1/search``."""
    def rank(sample: dict) -> int:
        hits = _post(client, "/v1/search", {"text": sample["caption"], "k": max(RECALL_AT)}, headers)["results"]
        keys = [hit["key"] for hit in hits]
        return keys.index(sample["key"]) if sample["key"] in keys else max(RECALL_AT)

    with ThreadPoolExecutor(concurrency) as pool:
        ranks = list(pool.map(rank, samples))
    return {k: sum(r < k for r in ranks) / max(len(ranks), 1) for k in RECALL_AT}


def main(argv: list[str] | None = None) -> int:
    import httpx

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--data", required=True, help="directory of the test shards")
    parser.add_argument("--classes", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    samples = read_samples(sorted(Path(args.data).glob("*.tar")))
    spec = json.loads(Path(args.classes).read_text())
    with httpx.Client(base_url=args.url, timeout=120) as client:
        top1, _ = zero_shot(client, samples, spec["classes"], spec["templates"], concurrency=args.concurrency)
        recall = text_to_image_recall(client, samples, concurrency=args.concurrency)
    result = {"zero_shot_top1": top1, **{f"text_to_image_recall@{k}": v for k, v in recall.items()},
              "num_samples": len(samples)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
