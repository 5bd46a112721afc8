"""What ``tandem serve`` is configured with (its flags, one field each)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

MAX_BODY_MB = 1024
PRECISIONS = ("fp32", "bf16")  # of the forward passes: --precision of tandem serve and tandem index


def body_bytes(megabytes: float) -> int:
    """``--max-body-mb`` in bytes; NaN, infinity or a value out of range is a one-line ``UserError``."""
    from training.errors import UserError

    if not (math.isfinite(megabytes) and 0 < megabytes <= MAX_BODY_MB):
        raise UserError(f"--max-body-mb must be > 0 and at most {MAX_BODY_MB}, got {megabytes}")
    return max(int(megabytes * 2**20), 1)


def _env_token() -> str | None:
    return os.environ.get("TANDEM_API_TOKEN") or None


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    model: str
    """Export directory (open_clip ``local-dir:``), or an open_clip model name / config .json with ``weights``."""
    weights: str | None = None
    """``.safetensors`` weights for a model name or config (pickle files are refused)."""
    index: str | None = None
    """Index directory written by ``tandem index`` (``/v1/search`` needs one)."""
    wait_for_model: bool = False
    """Start before the export directory ``model`` is complete and load it once it is (a Deployment
    applied with its training job); meanwhile ``/readyz`` answers 503 "waiting"."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: the forward passes under bf16 autocast (weights stay fp32). On the AVX512-BF16
    CPU it was measured on, 3.0x the requests/s under load (1.6x for a lone client); embeddings agree
    to a cosine of about 0.9999, so a prediction can differ from ``tandem eval``'s (fp32) where two
    labels nearly tie."""
    max_batch_size: int = 32
    """Most images (or texts) in one forward pass; 1 turns cross-request batching off."""
    max_wait_ms: float = 10.0
    """How long a lone request waits for others to join its batch."""
    workers: int = 4
    """Threads that decode images and search the index (the forward passes have their own thread)."""
    threads: int = 0
    """torch intra-op threads for the forward pass (0 keeps torch's default: one per core)."""
    max_pixels: int = 50_000_000
    """Images whose header declares more pixels are refused with 413 before decoding (bombs)."""
    max_body_bytes: int = 32 * 2**20
    """Request bodies over this are refused with 413."""
    label_cache: int = 64
    """Label sets (labels + templates) whose text embeddings are kept (LRU)."""
    nprobe: int = 16
    """IVF indexes: inverted lists visited per query."""
    ef_search: int = 64
    """HNSW indexes: search breadth."""
    api_token: str | None = field(default_factory=_env_token)
    """Bearer token required on /v1 and /metrics (default: ``TANDEM_API_TOKEN``; unset: no auth)."""
