"""Request and response bodies. Unknown fields are errors (422), never silently ignored."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from data.classes import is_template

MAX_IMAGES = 64  # per request
MAX_TEXTS = 256
MAX_LABELS = 1000
MAX_TEMPLATES = 100
MAX_PROMPTS = 8192  # labels * templates: the text encodings one new label set may cost
MAX_TEXT_CHARS = 2000  # the tokenizer keeps a few dozen tokens; longer input only costs bytes
MAX_K = 1000
MAX_EMBED_DIM = 8192
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _template(text: str) -> str:
    """Exactly one ``{}`` and no other replacement field, so ``text.format(label)`` cannot fail."""
    if not is_template(text):
        raise ValueError(f"template {text!r} needs exactly one '{{}}' (use '{{{{' for a literal brace)")
    return text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Label = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Template = Annotated[str, Field(min_length=2, max_length=MAX_TEXT_CHARS), AfterValidator(_template)]
Image = Annotated[str, Field(min_length=1, description="image bytes (JPEG, PNG, WebP ...) as base64 or a data: URL")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Scalar = str | bool | int | float
Filter = Annotated[dict[Annotated[str, Field(min_length=1, max_length=200)],
                        Scalar | Annotated[list[Scalar], Field(min_length=1, max_length=1000)]],
                   Field(max_length=32)]


# ---- /v1/embed ----

class EmbedRequest(Strict):
    """Texts and/or images to embed; at least one."""

    texts: list[Text] = Field(default_factory=list, max_length=MAX_TEXTS)
    images: list[Image] = Field(default_factory=list, max_length=MAX_IMAGES)

    @model_validator(mode="after")
    def _something(self) -> "EmbedRequest":
        if not self.texts and not self.images:
            raise ValueError("give at least one of 'texts' or 'images'")
        return self


class EmbedResponse(BaseModel):
    dim: int
    text_embeddings: list[list[float]] = Field(description="L2-normalised, one per text, in order")
    image_embeddings: list[list[float]] = Field(description="L2-normalised, one per image, in order")


# ---- /v1/classify ----

class LabelSet(Strict):
    """Candidate labels and the prompt templates whose embeddings are averaged per label."""

    labels: list[Label] = Field(min_length=1, max_length=MAX_LABELS)
    templates: list[Template] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1,
                                      max_length=MAX_TEMPLATES)
    top_k: int | None = Field(None, ge=1, le=MAX_LABELS, description="return only the k most probable labels")

    @model_validator(mode="after")
    def _prompt_budget(self) -> "LabelSet":
        if len(self.labels) * len(self.templates) > MAX_PROMPTS:
            raise ValueError(f"labels x templates is {len(self.labels) * len(self.templates)}, over {MAX_PROMPTS}")
        return self


class ClassifyRequest(LabelSet):
    images: list[Image] = Field(min_length=1, max_length=MAX_IMAGES)


class LabelScore(BaseModel):
    label: str
    probability: float = Field(description="softmax over the labels of logit_scale * score")
    score: float = Field(description="cosine similarity of the image and the label's embedding")


class Prediction(BaseModel):
    label: str = Field(description="the most probable label")
    labels: list[LabelScore] = Field(description="labels by decreasing probability")


class ClassifyResponse(BaseModel):
    logit_scale: float = Field(description="the model's learned scale exp(logit_scale) (1/temperature)")
    results: list[Prediction] = Field(description="one per image, in order")


# ---- /v1/search ----

class SearchOptions(Strict):
    k: int = Field(10, ge=1, le=MAX_K)
    filter: Filter | None = Field(None, description="metadata field -> value (or list of accepted values); "
                                                    "fields are key, caption, url or any key of the item's json")


class SearchRequest(SearchOptions):
    """A query by exactly one of text, image or embedding."""

    text: Text | None = None
    image: Image | None = None
    embedding: list[FiniteFloat] | None = Field(None, min_length=1, max_length=MAX_EMBED_DIM)

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [name for name in ("text", "image", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'text', 'image' or 'embedding' (got {given or 'none'})")
        return self


class Hit(BaseModel):
    id: int
    score: float = Field(description="cosine similarity to the query")
    key: str | None = None
    caption: str | None = None
    url: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class SearchResponse(BaseModel):
    results: list[Hit]


# ---- errors and probes ----

class ErrorDetail(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    detail: str | None = None
