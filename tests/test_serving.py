"""Serving over HTTP: agreement with ``tandem eval``, batching, errors, auth, readiness, metrics.

Most tests use the in-process client (FastAPI's TestClient, which runs the app's lifespan); one starts
a real ``tandem serve`` process on a free loopback port. The model is a randomly initialised
tandem-tiny: its predictions are arbitrary but deterministic, which is all agreement needs.
"""

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from serving.app import create_app
from serving.batcher import Batcher, ModelStopped
from serving.engine import ensemble, load_engine, prompts
from serving.index import Index
from serving.settings import ServeSettings
from tests.conftest import ROOT, free_port
from tests.scripts.serving_agreement import read_samples, text_to_image_recall, zero_shot
from tests.scripts.serving_fixtures import tiny_export, tiny_index  # noqa: F401 - fixtures

LABELS = ["red circle", "blue star", "green square"]


@pytest.fixture(scope="module")
def engine(tiny_export):
    return load_engine(str(tiny_export), device="cpu")


@pytest.fixture(scope="module")
def samples(synth_data):
    return read_samples(sorted((synth_data / "test").glob("*.tar")))


@contextmanager
def serve_in_process(export, engine=None, index=None, loader=None, **options):
    settings = ServeSettings(model=str(export), index=str(index) if index else None, device="cpu",
                             api_token=options.pop("api_token", None), **options)
    loaded = (engine, Index(index) if index else None) if engine is not None else None
    with TestClient(create_app(settings, loaded=loaded, loader=loader)) as client:
        yield client


@pytest.fixture(scope="module")
def api(tiny_export, engine, tiny_index):
    with serve_in_process(tiny_export, engine, tiny_index) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_bytes(size=(64, 64), fmt="JPEG", color=(200, 30, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            got = series[len(name):].strip("{}")
            if series.split("{")[0] == name and ",".join(sorted(got.split(","))) == want:
                return float(value)
    return 0.0


# ---- the numbers agree with tandem eval ----

def test_classify_and_search_agree_with_tandem_eval(api, tiny_export, synth_data, samples, engine):
    from data.classes import load_classes
    from data.pipeline import decode_image
    from training.cli import shard_pattern
    from training.evaluate import class_embeddings, evaluate_export

    classes_path = synth_data / "classes.json"
    reference = evaluate_export(str(tiny_export), shard_pattern(str(synth_data / "test")), str(classes_path))
    classes, templates = load_classes(classes_path)

    top1, predicted = zero_shot(api, samples, classes, templates)
    # per image, what the evaluation's code predicts: its decode, its classifier
    classifier = class_embeddings(engine.model, engine.tokenizer, classes, templates, "cpu")
    images = torch.stack([engine.transform(decode_image(s["jpg"], engine.image_size)) for s in samples])
    with torch.no_grad():
        expected = (engine.model.encode_image(images, normalize=True) @ classifier.T).argmax(1)
    expected = [classes[i] for i in expected]
    assert len(set(expected)) > 1  # not a degenerate model that predicts one class for everything
    assert predicted == expected
    assert reference["num_samples"] == len(samples)
    assert abs(top1 - reference["zero_shot_top1"]) <= 0.005

    recall = text_to_image_recall(api, samples)
    for k, value in recall.items():
        assert abs(value - reference[f"text_to_image_recall@{k}"]) <= 0.005, (k, value, reference)


def test_bf16_serving_stays_close_to_fp32(tiny_export, engine, synth_data, samples, monkeypatch):
    """--precision bf16: forward passes under autocast, float32 out, close to the fp32 engine's; the
    flag reaches the server, whose own forward passes (on its model thread) run in bf16."""
    import uvicorn

    from data.classes import load_classes
    from serving.decode import image_tensor
    from training.cli import main

    fast = load_engine(str(tiny_export), device="cpu", precision="bf16")
    images = torch.stack([image_tensor(s["jpg"], engine.transform, engine.image_size, 10**8) for s in samples])
    reference, ours = engine.encode_images(images), fast.encode_images(images)
    assert ours.dtype == torch.float32
    cosine = (reference * ours).sum(-1)
    assert cosine.min() > 0.999 and not torch.equal(reference, ours), cosine.min()  # close, and really bf16
    texts = [s["caption"] for s in samples[:16]]
    assert ((engine.encode_texts(texts) * fast.encode_texts(texts)).sum(-1)).min() > 0.999

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    assert main(["serve", "--model", str(tiny_export), "--precision", "bf16", "--port", "0"]) == 0
    settings = served[0].state.tandem.settings
    assert settings.precision == "bf16"
    with TestClient(create_app(replace(settings, device="cpu"))) as client:  # the app loads the model itself
        deadline = time.time() + 60
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline, client.get("/readyz").text
            time.sleep(0.1)
        answer = client.post("/v1/embed", json={"images": [b64(s["jpg"]) for s in samples[:4]]})
        embedded = torch.tensor(answer.json()["image_embeddings"])
        classes, templates = load_classes(synth_data / "classes.json")
        top1, predicted = zero_shot(client, samples, classes, templates)
    assert torch.allclose(embedded, ours[:4], atol=1e-6) and not torch.allclose(embedded, reference[:4], atol=1e-6)
    with serve_in_process(tiny_export, engine) as client:
        reference_top1, expected = zero_shot(client, samples, classes, templates)
    same = sum(a == b for a, b in zip(predicted, expected)) / len(samples)
    assert same >= 0.95 and abs(top1 - reference_top1) <= 0.05, (same, top1, reference_top1)


def test_label_set_embedding_is_the_evaluation_classifier(engine):
    from training.evaluate import class_embeddings

    templates = ["a photo of a {}.", "the {}.", "a {} shape"]
    expected = class_embeddings(engine.model, engine.tokenizer, LABELS, templates, "cpu")
    ours = ensemble(engine.encode_texts(prompts(LABELS, templates)), len(templates))
    assert torch.allclose(ours, expected, atol=1e-5)


def test_decode_matches_the_training_pipeline(samples):
    from data.pipeline import decode_image as pipeline_decode

    from serving.decode import decode_image

    for size in (48, 16):  # 16 < 64: the JPEG decodes at a reduced DCT scale, in both
        a, b = decode_image(samples[0]["jpg"], size, 10**8), pipeline_decode(samples[0]["jpg"], size)
        assert a.size == b.size and a.tobytes() == b.tobytes()

    # Other modes: 16-bit greyscale PNG and 32-bit float TIFF (scaled to 8 bits, not clipped to white),
    # palette with transparency, greyscale with alpha, CMYK JPEG.
    ramp = np.linspace(0, 1, 40 * 30, dtype=np.float64).reshape(30, 40)
    images = {
        "png": Image.fromarray((ramp * 65535).astype(np.uint16)),
        "tiff": Image.fromarray(ramp.astype(np.float32), "F"),
        "gif": Image.open(io.BytesIO(samples[1]["jpg"])).convert("P", palette=Image.Palette.ADAPTIVE),
        "webp": Image.open(io.BytesIO(samples[2]["jpg"])).convert("LA"),
        "jpeg": Image.open(io.BytesIO(samples[3]["jpg"])).convert("CMYK"),
    }
    for fmt, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"transparency": 0} if fmt == "gif" else {}))
        data = buffer.getvalue()
        a, b = decode_image(data, 16, 10**8), pipeline_decode(data, 16)
        assert a.mode == b.mode == "RGB" and a.size == b.size and a.tobytes() == b.tobytes(), fmt
        if fmt in ("png", "tiff"):
            assert abs(np.asarray(a).mean() - 127.5) < 2, (fmt, np.asarray(a).mean())  # a ramp, not white
    # A camera's sideways JPEG with its EXIF orientation (6: turn 90 degrees clockwise) comes out upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    a, b = decode_image(buffer.getvalue(), 16, 10**8), pipeline_decode(buffer.getvalue(), 16)
    assert a.size == b.size == (20, 40) and a.tobytes() == b.tobytes()


def test_the_scaled_pixel_cap_refuses_thin_strips_but_not_small_images():
    from serving.decode import decode_image
    from serving.errors import TooLarge

    def png(width: int, height: int) -> bytes:
        out = io.BytesIO()
        Image.new("L", (width, height)).save(out, format="PNG")
        return out.getvalue()

    # under a cap below one 224 px crop, a small image (scaled up to 224 x 224) and a 16:1 one still decode
    assert decode_image(png(100, 100), 224, 40_000).size == (100, 100)
    assert decode_image(png(10, 160), 224, 40_000).size == (10, 160)
    for width, height, cap in ((10, 170, 40_000), (1, 1000, 50_000_000 // 1000), (1, 100_000, 50_000_000)):
        with pytest.raises(TooLarge, match="on its short side for the model"):
            decode_image(png(width, height), 224, cap)


def test_embed_texts_and_images_are_normalised_and_match_the_model(api, engine, samples):
    body = {"texts": ["a red circle", "a blue star"], "images": [b64(samples[0]["jpg"])]}
    result = api.post("/v1/embed", json=body).json()
    assert result["dim"] == engine.embed_dim
    texts, images = torch.tensor(result["text_embeddings"]), torch.tensor(result["image_embeddings"])
    assert texts.shape == (2, engine.embed_dim) and images.shape == (1, engine.embed_dim)
    assert torch.allclose(texts.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts, engine.encode_texts(body["texts"]), atol=1e-5)
    upload = api.post("/v1/embed/upload", files=[("images", ("a.jpg", samples[0]["jpg"], "image/jpeg"))])
    assert torch.allclose(torch.tensor(upload.json()["image_embeddings"]), images, atol=1e-6)


def test_classify_probabilities_use_the_model_temperature(api, engine, samples):
    body = {"images": [b64(samples[1]["jpg"])], "labels": LABELS, "templates": ["a photo of a {}."]}
    result = api.post("/v1/classify", json=body).json()
    assert result["logit_scale"] == pytest.approx(engine.model.logit_scale.exp().item(), rel=1e-6)
    ranked = result["results"][0]["labels"]
    scores = torch.tensor([r["score"] for r in ranked])
    assert torch.allclose(torch.tensor([r["probability"] for r in ranked]),
                          (result["logit_scale"] * scores).softmax(0), atol=1e-5)
    assert [r["probability"] for r in ranked] == sorted((r["probability"] for r in ranked), reverse=True)
    files = [("images", ("x.jpg", samples[1]["jpg"], "image/jpeg"))]
    upload = api.post("/v1/classify/upload", files=files, data={"labels": LABELS, "templates": body["templates"]})
    assert upload.json()["results"] == result["results"]
    assert len(api.post("/v1/classify", json={**body, "top_k": 2}).json()["results"][0]["labels"]) == 2


def test_search_filter_applies_inside_the_search(api, samples, engine):
    shape = "star"
    wanted = {s["key"] for s in samples if s["class"].endswith(shape)}
    hits = api.post("/v1/search", json={"text": "a red circle", "k": 5, "filter": {"shape": shape}}).json()["results"]
    # k hits, all matching: a post-filter of the unfiltered top 5 would mostly come back empty
    assert len(hits) == 5 and all(h["meta"]["shape"] == shape and h["key"] in wanted for h in hits)
    query = engine.encode_texts(["a red circle"])[0].tolist()
    by_embedding = api.post("/v1/search", json={"embedding": query, "k": 5, "filter": {"shape": shape}}).json()
    assert [h["id"] for h in by_embedding["results"]] == [h["id"] for h in hits]
    either = api.post("/v1/search", json={"text": "x", "k": 200, "filter": {"shape": ["star", "cross"]}}).json()
    assert {h["meta"]["shape"] for h in either["results"]} == {"star", "cross"}
    assert api.post("/v1/search", json={"text": "x", "filter": {"shape": "hexagon"}}).json()["results"] == []
    image_hits = api.post("/v1/search", json={"image": b64(samples[3]["jpg"]), "k": 1}).json()["results"]
    assert image_hits[0]["key"] == samples[3]["key"] and image_hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


# ---- bad input: 4xx with a clear message, never 5xx, and the server keeps serving ----

def _bomb() -> bytes:
    out = io.BytesIO()
    Image.new("1", (6000, 6000)).save(out, format="PNG")  # 36 Mpx in a few kB
    return out.getvalue()


def _strip() -> bytes:
    out = io.BytesIO()
    Image.new("L", (1, 100_000)).save(out, format="PNG")  # a few hundred bytes; 48 x 4.8M once scaled
    return out.getvalue()


BAD_REQUESTS = [
    ("not an image", "/v1/classify", {"images": [b64(b"hello, world")], "labels": LABELS}, 400, "not an image"),
    ("truncated", "/v1/classify", {"images": [b64(image_bytes()[:300])], "labels": LABELS}, 400, "cannot be decoded"),
    ("not base64", "/v1/classify", {"images": ["%%%"], "labels": LABELS}, 400, "base64"),
    ("bomb", "/v1/classify", {"images": [b64(_bomb())], "labels": LABELS}, 413, "over the cap"),
    ("thin strip", "/v1/embed", {"images": [b64(_strip())]}, 413, "on its short side for the model"),
    ("no labels", "/v1/classify", {"images": [b64(image_bytes())], "labels": []}, 422, "labels"),
    ("too many labels", "/v1/classify", {"images": [b64(image_bytes())], "labels": ["x"] * 1001}, 422, "labels"),
    ("no images", "/v1/classify", {"images": [], "labels": LABELS}, 422, "images"),
    ("unknown field", "/v1/classify", {"images": [b64(image_bytes())], "labels": LABELS, "x": 1}, 422, "x: Extra"),
    ("bad template", "/v1/classify", {"images": [b64(image_bytes())], "labels": LABELS, "templates": ["{0}"]},
     422, "exactly one"),
    ("empty embed", "/v1/embed", {}, 422, "at least one"),
    ("wrong dimension", "/v1/search", {"embedding": [0.5] * 7}, 400, "dimension 7"),
    ("zero embedding", "/v1/search", {"embedding": [0.0] * 128}, 400, "non-zero"),
    ("two queries", "/v1/search", {"text": "a", "embedding": [0.5] * 128}, 422, "exactly one"),
    ("k too large", "/v1/search", {"text": "a", "k": 100000}, 422, "k"),
    ("bad filter", "/v1/search", {"text": "a", "filter": {"shape": {"nested": 1}}}, 422, "filter"),
]


@pytest.mark.parametrize("name,path,body,status,needle", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx(tiny_export, engine, tiny_index, name, path, body, status, needle):
    with serve_in_process(tiny_export, engine, tiny_index, max_pixels=10**7) as client:
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        assert needle in response.json()["error"]["message"]
        ok = client.post("/v1/classify", json={"images": [b64(image_bytes())], "labels": LABELS})
        assert ok.status_code == 200  # the worker survived


def test_malformed_bodies_and_oversized_bodies(api, tiny_export, engine):
    assert api.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert api.post("/v1/search", content=b'{"embedding": [NaN]}',
                    headers={"content-type": "application/json"}).status_code == 422
    assert api.post("/v1/classify/upload", files=[("images", ("a.txt", b"text", "text/plain"))],
                    data={"labels": LABELS}).status_code == 400
    assert api.post("/v1/search/upload", files=[("image", ("a.jpg", image_bytes(), "image/jpeg"))],
                    data={"filter": "{oops"}).status_code == 422
    # a misspelt form field is refused, as an unknown JSON field is (FastAPI would drop it unseen)
    one = [("images", ("a.jpg", image_bytes(), "image/jpeg"))]
    for path, files, data in (("/v1/classify/upload", one, {"labels": LABELS, "topk": "1"}),
                              ("/v1/embed/upload", one, {"text": "a"}),
                              ("/v1/search/upload", [("image", ("a.jpg", image_bytes(), "image/jpeg"))],
                               {"top_k": "3"})):
        response = api.post(path, files=files, data=data)
        assert response.status_code == 422 and "Extra inputs" in response.json()["error"]["message"], response.text
    # what json.loads raises besides a syntax error: 400, as /v1/search answers the same filter
    for unparsable in ('{"a": ' + "9" * 5000 + "}", "[" * 100_000, '{"a":' * 3000):
        upload = api.post("/v1/search/upload", files=[("image", ("a.jpg", image_bytes(), "image/jpeg"))],
                          data={"filter": unparsable})
        assert upload.status_code == 400 and "filter" in upload.json()["error"]["message"], upload.text
    with serve_in_process(tiny_export, engine, max_body_bytes=10_000) as client:
        big = {"images": [b64(os.urandom(20_000))], "labels": LABELS}
        response = client.post("/v1/classify", json=big)
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
        chunked = client.post("/v1/classify", content=iter([json.dumps(big).encode()]),
                              headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert client.post("/v1/search", json={"text": "a"}).status_code == 404  # no index loaded
        assert 'status="413"' in client.get("/metrics").text


# ---- auth, readiness, metrics ----

def test_bearer_token_auth(tiny_export, engine):
    with serve_in_process(tiny_export, engine, api_token="s3cret") as client:
        body = {"texts": ["a"]}
        assert client.post("/v1/embed", json=body).status_code == 401
        assert client.post("/v1/embed", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.post("/v1/embed", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    with serve_in_process(tiny_export, engine, api_token="sécret-ключ") as client:  # a UTF-8 client's bytes
        wrong = {"Authorization": b"Bearer s\xc3\xa9cret-"}
        right = {"Authorization": "Bearer sécret-ключ".encode()}
        assert client.post("/v1/embed", json=body, headers=wrong).status_code == 401
        assert client.post("/v1/embed", json=body, headers=right).status_code == 200


def test_not_ready_until_the_model_has_loaded(tiny_export, engine):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return engine, None

    with serve_in_process(tiny_export, loader=slow_loader) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        response = client.post("/v1/embed", json={"texts": ["a"]})
        assert response.status_code == 503 and "loading" in response.json()["error"]["message"]
        release.set()
        deadline = time.time() + 30
        while client.get("/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 200

    def broken_loader():
        raise FileNotFoundError("no such model")

    with serve_in_process(tiny_export, loader=broken_loader) as client:
        deadline = time.time() + 30
        while "failed" not in client.get("/readyz").text and time.time() < deadline:
            time.sleep(0.05)
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 503
        assert "no such model" in client.post("/v1/embed", json={"texts": ["a"]}).json()["error"]["message"]


def test_metrics_count_routes_stages_and_label_cache(tiny_export, engine):
    with serve_in_process(tiny_export, engine) as client:
        body = {"images": [b64(image_bytes())], "labels": LABELS}
        for _ in range(3):
            assert client.post("/v1/classify", json=body).status_code == 200
        client.post("/v1/classify", json={"images": ["!"], "labels": LABELS})
        text = client.get("/metrics").text
    assert metric(text, "tandem_serve_requests_total", route="/v1/classify", method="POST", status="200") == 3
    assert metric(text, "tandem_serve_requests_total", route="/v1/classify", method="POST", status="400") == 1
    for stage in ("decode", "predict", "encode"):
        assert metric(text, "tandem_serve_stage_seconds_count", route="/v1/classify", stage=stage) >= 3
    assert metric(text, "tandem_serve_label_cache_total", result="miss") == 1
    assert metric(text, "tandem_serve_label_cache_total", result="hit") == 2
    assert metric(text, "tandem_serve_batch_size_count", kind="image") == 3
    assert "tandem_serve_queue_depth" in text and metric(text, "tandem_serve_ready") == 1


def test_metrics_labels_stay_bounded_and_client_aborts_are_not_500(tiny_export, engine):
    with serve_in_process(tiny_export, engine) as client:
        for method in ("XFOO", "BREW", "XFOO"):
            assert client.request(method, "/healthz").status_code == 405
        app = client.app

        async def abort() -> None:  # a client that sends part of a body and hangs up
            messages = iter([{"type": "http.request", "body": b'{"texts": [', "more_body": True},
                             {"type": "http.disconnect"}])
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/embed", "raw_path": b"/v1/embed", "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json")],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
            sent = []
            await app(scope, lambda: _next(messages), lambda message: _append(sent, message))
            assert sent == []

        for _ in range(2):
            asyncio.run(abort())
        text = client.get("/metrics").text
    assert metric(text, "tandem_serve_requests_total", route="/healthz", method="other", status="405") == 3
    assert "XFOO" not in text and "BREW" not in text
    assert metric(text, "tandem_serve_requests_total", route="/v1/embed", method="POST", status="499") == 2
    assert metric(text, "tandem_serve_requests_total", route="/v1/embed", method="POST", status="500") == 0


async def _next(messages):
    return next(messages)


async def _append(sent, message):
    sent.append(message)


# ---- batching ----

def test_batcher_groups_concurrent_items_and_survives_errors():
    sizes = []

    def double(items):
        sizes.append(len(items))
        if "boom" in items:
            raise ValueError("boom")
        return [2 * x for x in items]

    batcher = Batcher({"x": double}, max_batch_size=8, max_wait_ms=300)
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: batcher.submit("x", [i])[0].result(10), range(8)))
        assert results == [2 * i for i in range(8)] and max(sizes) > 1 and sum(sizes) == 8
        futures = batcher.submit("x", [1, "boom"])
        with pytest.raises(ValueError):
            futures[1].result(10)
        assert batcher.submit("x", [21])[0].result(10) == 42  # the model thread is still alive
        assert batcher.call(lambda: "alone").result(10) == "alone"
    finally:
        batcher.close()
    one = Batcher({"x": double}, max_batch_size=1, max_wait_ms=50)
    sizes.clear()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: one.submit("x", [i])[0].result(10), range(4)))
        assert sizes == [1, 1, 1, 1]
    finally:
        one.close()


def _fails_once():
    """A queue-depth callback that raises once on the model thread: an error outside any handler."""
    raised = []

    def depth(kind: str, size: int) -> None:
        if threading.current_thread().name == "tandem-model" and not raised:
            raised.append(kind)
            raise OverflowError("timeout value is too large")

    return depth


def test_batcher_waits_as_long_as_told_and_reports_a_stopped_thread():
    # 1e13 ms is past threading.TIMEOUT_MAX: the wait is clamped, the lone item waits for its batch
    patient = Batcher({"x": lambda items: [2 * x for x in items]}, max_batch_size=2, max_wait_ms=1e13)
    try:
        first = patient.submit("x", [1])[0]
        with pytest.raises(TimeoutError):
            first.result(0.5)
        assert patient.failure is None
        assert patient.submit("x", [2])[0].result(10) == 4 and first.result(10) == 2
    finally:
        patient.close()

    doomed = Batcher({"x": lambda items: items}, max_batch_size=4, max_wait_ms=0, on_depth=_fails_once())
    try:
        with pytest.raises(ModelStopped, match="OverflowError"):
            doomed.submit("x", [1])[0].result(10)
        assert "OverflowError" in doomed.failure
        with pytest.raises(ModelStopped):
            doomed.submit("x", [2])
    finally:
        doomed.close()


def test_a_stopped_model_thread_fails_requests_and_probes(tiny_export, engine, tiny_index):
    with serve_in_process(tiny_export, engine, tiny_index) as client:
        dim = engine.embed_dim
        assert client.post("/v1/search", json={"embedding": [0.5] * dim}).status_code == 200
        client.app.state.tandem.service.batcher._on_depth = _fails_once()
        pool = ThreadPoolExecutor(1)  # a bounded wait: before the fix the request hung forever
        try:
            response = pool.submit(client.post, "/v1/embed", json={"texts": ["a"]}).result(60)
        finally:
            pool.shutdown(wait=False)
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_stopped"
        assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 503
        # every later request, also one that needs no forward pass (a search by embedding)
        later = client.post("/v1/search", json={"embedding": [0.5] * dim})
        assert later.status_code == 503 and later.json()["error"]["code"] == "model_stopped", later.text
        for probe in ("/healthz", "/readyz"):
            answer = client.get(probe)
            assert answer.status_code == 503 and "OverflowError" in answer.json()["detail"]
        assert metric(client.get("/metrics").text, "tandem_serve_ready") == 0


# ---- one real server process ----

@pytest.mark.slow
def test_real_server_process(tiny_export, tiny_index, samples, api, synth_data):
    """``tandem serve`` on a loopback port: ready, same answers as in-process, batching, auth."""
    port, token = free_port(), "t0ken"
    env = {**os.environ, "TANDEM_API_TOKEN": token, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "training.cli", "serve", "--model", str(tiny_export), "--index",
               str(tiny_index), "--port", str(port), "--max-wait-ms", "100", "--device", "cpu"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.time() + 180
            while time.time() < deadline:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            else:
                pytest.fail("server did not become ready")
            assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 401
            classes = json.loads((synth_data / "classes.json").read_text())
            subset = samples[:32]
            _, remote = zero_shot(client, subset, classes["classes"], classes["templates"], per_request=1,
                                  concurrency=8, headers=auth)
            _, local = zero_shot(api, subset, classes["classes"], classes["templates"], per_request=8)
            assert remote == local
            assert text_to_image_recall(client, subset[:8], headers=auth) == text_to_image_recall(api, subset[:8])
            text = client.get("/metrics", headers=auth).text
            count = metric(text, "tandem_serve_batch_size_count", kind="image")
            # 32 single-image requests from 8 threads: grouped into fewer forward passes
            assert metric(text, "tandem_serve_batch_size_sum", kind="image") == 32 and count < 32
            assert client.get("/docs").status_code == 200 and "/v1/classify" in client.get("/openapi.json").text
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it (exit status -15)
    assert proc.returncode in (0, -15) and "Application shutdown complete" in output, output[-3000:]
    assert "Traceback" not in output


@pytest.mark.slow
def test_serving_runs_without_the_training_packages(tiny_export, tiny_index):
    script = f"""
import sys
# The serving image installs only the serve group: none of the training side's packages.
for name in ("boto3", "botocore", "braceexpand", "pyarrow", "deepspeed", "webdataset"):
    sys.modules[name] = None  # an import of any of them now fails
import uvicorn
uvicorn.run = lambda app, **kw: print("would serve", type(app).__name__)
from training.cli import main
assert main(["serve", "--model", {str(tiny_export)!r}, "--index", {str(tiny_index)!r}]) == 0
import serving.app, serving.service, serving.index, serving.engine, serving.batcher
heavy = sorted(m for m, module in sys.modules.items() if module is not None and m.split(".")[0] in ("deepspeed", "webdataset"))
print("heavy:", heavy)
try:
    import data.pipeline  # the check itself can fail: the training side does need them
except ImportError:
    print("control: True")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "would serve FastAPI" in proc.stdout
    assert "heavy: []" in proc.stdout and "control: True" in proc.stdout


def test_cli_errors_are_one_line(tiny_export, tmp_path, capsys):
    from training.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not an exported model" in capsys.readouterr().err
    assert main(["serve", "--model", "ViT-B-32", "--weights", str(tmp_path / "w.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_export), "--index", str(tmp_path)]) == 2
    assert "not a finished index" in capsys.readouterr().err
    # a port in use and a host that does not resolve: one line, before the model loads (uvicorn's own
    # failure was a multi-line log and exit 3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", str(tiny_export), "--port", port]) == 2
        assert capsys.readouterr().err == f"tandem: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert main(["serve", "--model", str(tiny_export), "--host", "no-such-host.invalid"]) == 2
    assert capsys.readouterr().err.startswith("tandem: error: cannot listen on no-such-host.invalid:8000: ")
    from serving.app import check_listen

    for host in ("", "localhost", "0.0.0.0"):  # all interfaces, each address of a name: free ports pass
        check_listen(host, 0)


def test_wait_for_model_serves_an_export_written_after_start(tiny_export, tmp_path, monkeypatch, capsys):
    """A Deployment applied with its training job: the export is not there at start. Without the flag
    that is one line; with it the server is live, not ready ("waiting"), and loads the export once it
    appears (here moved into place whole, as `tandem export` renames each file)."""
    import shutil

    import uvicorn

    from serving import app as app_module
    from serving.app import check_settings
    from training.cli import main
    from training.errors import UserError

    export = tmp_path / "run" / "export"
    with pytest.raises(UserError, match="is not an export directory"):
        check_settings(ServeSettings(model=str(export)))
    check_settings(ServeSettings(model=str(export), wait_for_model=True))
    with pytest.raises(UserError, match="--wait-for-model waits for an export directory"):
        check_settings(ServeSettings(model="ViT-B-32", weights="w.safetensors", wait_for_model=True))

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    assert main(["serve", "--model", str(export), "--wait-for-model", "--port", "0"]) == 0
    assert served[0].state.tandem.settings.wait_for_model is True
    capsys.readouterr()

    monkeypatch.setattr(app_module, "WAIT_POLL_S", 0.05)
    settings = ServeSettings(model=str(export), device="cpu", wait_for_model=True)
    with TestClient(create_app(settings)) as client:
        time.sleep(0.3)
        assert client.get("/healthz").status_code == 200
        waiting = client.get("/readyz")
        assert waiting.status_code == 503 and waiting.json() == {"status": "waiting",
                                                                  "detail": f"for the export at {export}"}
        assert client.post("/v1/embed", json={"texts": ["a"]}).status_code == 503
        text = client.get("/metrics").text  # the alerts tell a waiting replica from a failing one
        assert metric(text, "tandem_serve_waiting_for_model") == 1 and metric(text, "tandem_serve_ready") == 0
        shutil.copytree(tiny_export, tmp_path / "staging" / "export")
        (tmp_path / "staging").rename(export.parent)  # the run folder, export inside, appears at once
        deadline = time.time() + 60
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline and client.app.state.tandem.error is None, client.get("/readyz").text
            time.sleep(0.1)
        embedded = client.post("/v1/embed", json={"texts": ["a red circle"]})
        assert embedded.status_code == 200 and len(embedded.json()["text_embeddings"]) == 1
        text = client.get("/metrics").text
        assert metric(text, "tandem_serve_waiting_for_model") == 0 and metric(text, "tandem_serve_ready") == 1


def test_a_wait_that_fails_is_not_reported_as_waiting(tmp_path, monkeypatch):
    """The run volume refusing a stat while the server waits: /readyz says failed, and so does the
    waiting gauge (at 1 it would hold the no-ready-replica alert back)."""
    from serving import app as app_module

    looks = []

    def export_complete(path):
        looks.append(path)
        if len(looks) >= 3:
            raise PermissionError(13, "Permission denied", path)
        return False

    monkeypatch.setattr(app_module, "WAIT_POLL_S", 0.05)
    monkeypatch.setattr(app_module, "export_complete", export_complete)
    settings = ServeSettings(model=str(tmp_path / "run" / "export"), device="cpu", wait_for_model=True)
    with TestClient(create_app(settings)) as client:
        deadline = time.time() + 30
        while client.get("/readyz").json()["status"] != "failed":
            assert time.time() < deadline
            time.sleep(0.05)
        text = client.get("/metrics").text
    assert metric(text, "tandem_serve_waiting_for_model") == 0 and metric(text, "tandem_serve_ready") == 0


def test_serve_flags_are_finite_and_bounded(tiny_export, monkeypatch, capsys):
    import uvicorn

    from training.cli import main

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    for flag, value in [("--max-wait-ms", "inf"), ("--max-wait-ms", "1e13"), ("--max-wait-ms", "nan"),
                        ("--max-body-mb", "nan"), ("--max-body-mb", "inf"), ("--max-body-mb", "0"),
                        ("--nprobe", "0"), ("--ef-search", str(2**40)), ("--workers", "0"),
                        ("--threads", str(10**9))]:
        assert main(["serve", "--model", str(tiny_export), flag, value]) == 2, (flag, value)
        error = capsys.readouterr().err
        assert error.startswith(f"tandem: error: {flag} ") and error.count("\n") == 1, error
    assert served == []
    assert main(["serve", "--model", str(tiny_export), "--nprobe", "64", "--ef-search", "200",
                 "--max-wait-ms", "2.5", "--port", "0"]) == 0
    settings = served[0].state.tandem.settings
    assert (settings.nprobe, settings.ef_search, settings.max_wait_ms) == (64, 200, 2.5)
