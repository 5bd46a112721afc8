"""Property-based: requests generated from the OpenAPI schema never get a 5xx; memory stays bounded."""

import base64
import io
import resource

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from serving.app import create_app
from serving.engine import load_engine
from serving.index import Index
from serving.settings import ServeSettings
from tests.scripts.serving_fixtures import tiny_export, tiny_index  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def app(tiny_export, tiny_index):
    settings = ServeSettings(model=str(tiny_export), index=str(tiny_index), device="cpu", api_token=None,
                             max_wait_ms=0, label_cache=16)
    return create_app(settings, loaded=(load_engine(str(tiny_export), device="cpu"), Index(tiny_index)))


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_memory_stays_bounded_under_repeated_requests(app):
    """Many requests, each with a new label set: the LRU keeps the cache (and RSS) bounded."""
    out = io.BytesIO()
    Image.new("RGB", (96, 96), (10, 200, 30)).save(out, format="JPEG")
    image = base64.b64encode(out.getvalue()).decode()
    with TestClient(app) as client:
        def burst(n: int, offset: int) -> None:
            for i in range(n):
                body = {"images": [image] * 2, "labels": [f"thing {offset + i}", "other"], "top_k": 1}
                assert client.post("/v1/classify", json=body).status_code == 200
                assert client.post("/v1/search", json={"text": f"query {i}", "k": 20}).status_code == 200
        burst(40, 0)  # warm-up: allocator pools, the label cache filled to its bound
        before = _rss_mb()
        burst(120, 1000)
        growth = _rss_mb() - before
        assert len(app.state.tandem.service._labels) <= app.state.tandem.settings.label_cache
    assert growth < 40, f"RSS grew by {growth:.1f} MB over 240 requests"
