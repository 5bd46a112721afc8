"""Request texts: open_clip's tokens at a bounded cost, tokenized off the model thread."""

import random
import string
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from open_clip.tokenizer import SimpleTokenizer

from serving.app import create_app
from serving.engine import load_engine
from serving.settings import ServeSettings
from serving.text import MAX_WORD, BoundedTokenizer
from tests.scripts.serving_fixtures import tiny_export  # noqa: F401 - fixture
from tests.test_serving import b64, image_bytes


def _texts() -> list[str]:
    """Captions of every length up to several times the context, and the odd characters of real ones."""
    rnd, vocab = random.Random(0), SimpleTokenizer().encoder
    words = [w[:-4] for w in vocab if w.endswith("</w>")]
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randrange(1, 200))) for _ in range(120)]
    return texts + ["a photo of a cat.", "Ünïcödé façade — naïve café", "东京的夜景，非常漂亮的城市风光" * 2,
                    "&amp; &lt;b&gt; html", "  lots   of\n\nwhitespace\t", "🐱" * 30, "it's a dog's life",
                    "<start_of_text> 3.14159 and 42", "x" * 120 + " end"]


@pytest.mark.parametrize("context_length", [24, 77])
def test_same_tokens_as_open_clip(context_length):
    tokenizer = SimpleTokenizer(context_length=context_length)
    texts = _texts()
    assert max(len(tokenizer.encode(t)) for t in texts) > 2 * context_length  # many are cut
    assert torch.equal(BoundedTokenizer(tokenizer)(texts), tokenizer(texts))


def test_cost_is_bounded_and_the_cache_too():
    rnd = random.Random(1)
    tokenizer = BoundedTokenizer(SimpleTokenizer(context_length=77), cache_words=100)
    encoded: list[str] = []
    real_bpe = tokenizer.tokenizer.bpe
    tokenizer.tokenizer.bpe = lambda word: encoded.append(word) or real_bpe(word)
    letters = ["".join(rnd.choice(string.ascii_lowercase) for _ in range(2000)) for _ in range(8)]
    tokens = tokenizer(letters)
    assert (tokens[:, -1] == tokenizer.tokenizer.eot_token_id).all()  # each filled the context
    # the quadratic part is per word: no word over MAX_WORD bytes, and only what fills the context
    assert max(map(len, encoded)) <= MAX_WORD and sum(map(len, encoded)) <= 8 * 2 * MAX_WORD
    tokenizer(["".join(rnd.choice(string.ascii_lowercase) for _ in range(8)) for _ in range(500)])
    cache = tokenizer.tokenizer.cache
    assert len(cache) <= 100 and "<start_of_text>" in cache and "<end_of_text>" in cache


def test_server_tokenizes_on_the_decode_threads_with_bounded_words(tiny_export, monkeypatch):
    engine = load_engine(str(tiny_export), device="cpu")
    settings = ServeSettings(model=str(tiny_export), device="cpu", api_token=None)
    calls: list[tuple[str, int]] = []
    real_bpe = SimpleTokenizer.bpe
    monkeypatch.setattr(SimpleTokenizer, "bpe",
                        lambda self, word: calls.append((threading.current_thread().name, len(word)))
                        or real_bpe(self, word))
    rnd = random.Random(2)
    long = ["".join(rnd.choice(string.ascii_lowercase) for _ in range(2000)) for _ in range(4)]
    normal = ["a red circle", "a big blue star in the top left corner, next to a small green square " * 3]
    with TestClient(create_app(settings, loaded=(engine, None))) as client:
        result = client.post("/v1/embed", json={"texts": long + normal})
        classify = client.post("/v1/classify", json={"images": [b64(image_bytes(fmt="PNG"))],
                                                      "labels": ["qwxz", "zzyqv"]})
    assert result.status_code == 200 and classify.status_code == 200
    assert calls and all(name.startswith("tandem-decode") for name, _ in calls)  # never the model thread
    assert max(size for _, size in calls) <= MAX_WORD
    with torch.no_grad():  # a normal text's embedding is the model's own of open_clip's tokens
        expected = engine.model.encode_text(engine.tokenizer(normal), normalize=True)
    assert torch.allclose(torch.tensor(result.json()["text_embeddings"][4:]), expected, atol=1e-5)
