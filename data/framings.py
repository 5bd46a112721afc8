"""How much of the frame the synthetic shape fills, per framing: plain data, no imports, so the CLI
parser can offer the names without loading numpy and PIL with ``data.synth``."""

# Half-extent of the shape as a fraction of the image side, per framing:
# - "scene": a small shape somewhere on a large background (3-20% of the frame), so position and size
#   are worth captioning; CLIP's demo data.
# - "object": object-centric, as in the ImageNet-style photos the self-supervised papers' crops are
#   designed around: the shape fills 14-45% of the frame, so two random crops of one image both show
#   it. On "scene" images most crops hold background only, and instance discrimination learns the
#   background, colour and noise that identify an image instead of the shape.
FRAMINGS: dict[str, dict[str, tuple[float, float]]] = {
    "scene": {"small": (0.12, 0.15), "medium": (0.18, 0.22), "large": (0.25, 0.29)},
    "object": {"small": (0.25, 0.30), "medium": (0.30, 0.35), "large": (0.35, 0.40)},
}
