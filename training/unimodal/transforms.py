"""Each paper's multi-view augmentation, as one transform the existing shard loader can apply.

The loader stacks one tensor per sample, so ``MultiView`` returns every view flattened and
concatenated (views may differ in size: SwAV's multi-crop); ``parts.split_views`` undoes it.

Blur sigmas are the papers' (0.1-2.0 px at 224 px) scaled to the crop size, so a 48 px crop is
blurred as much, relative to its content, as a 224 px one. (The papers' sigmas taken literally at
48 px blur away the corners that tell the synthetic shapes apart: shape kNN then falls below the
untrained backbone's.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision import transforms as T


@dataclass(frozen=True)
class ViewRecipe:
    """One view: crop and the photometric augmentations with their probabilities."""

    size: int
    min_scale: float
    max_scale: float = 1.0
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0

    def build(self) -> T.Compose:
        sigma = (0.1 * self.size / 224, 2.0 * self.size / 224)
        kernel = max(3, (self.size // 10) | 1)  # ~10% of the side, odd
        steps = [
            T.RandomResizedCrop(self.size, scale=(self.min_scale, self.max_scale),
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(*self.jitter)], p=self.jitter_p),
            T.RandomGrayscale(p=self.gray_p),
        ]
        if self.blur_p:
            steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma)], p=self.blur_p))
        if self.solarize_p:
            steps.append(T.RandomSolarize(128, p=self.solarize_p))
        steps += [T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
        return T.Compose(steps)


class MultiView:
    """PIL image -> ``[sum of view sizes]``: every view, flattened, in recipe order."""

    def __init__(self, recipes: list[ViewRecipe]):
        self.recipes = recipes
        self.transforms = [r.build() for r in recipes]

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [(3, r.size, r.size) for r in self.recipes]

    def __call__(self, image) -> torch.Tensor:
        return torch.cat([t(image).reshape(-1) for t in self.transforms])


def recipes(method: str, size: int, min_scale: float = 0.0, small_crops: int = 2) -> list[ViewRecipe]:
    """The views of ``method`` at crop side ``size``; ``min_scale`` 0 keeps the paper's crop."""
    if method in ("byol", "barlow_twins", "moco_v3"):
        # BYOL's asymmetric pair (Barlow Twins and MoCo v3 reuse it): always blurred vs rarely
        # blurred + solarised.
        scale = min_scale or 0.08
        jitter = (0.4, 0.4, 0.2, 0.1)
        return [ViewRecipe(size, scale, jitter=jitter, blur_p=1.0),
                ViewRecipe(size, scale, jitter=jitter, blur_p=0.1, solarize_p=0.2)]
    if method == "swav":
        # Multi-crop: two global crops and low-resolution crops of small areas, every crop with
        # SimCLR's colour distortion at strength 1 (jitter 0.8, 0.8, 0.8, 0.2), as SwAV's code has it.
        scale = min_scale or 0.14
        small = max(8, size // 2)
        jitter = (0.8, 0.8, 0.8, 0.2)
        return ([ViewRecipe(size, scale, jitter=jitter)] * 2
                + [ViewRecipe(small, min(0.05, scale / 2), scale, jitter=jitter)] * small_crops)
    if method in ("simclr", "supcon"):
        # SimCLR's small-image (CIFAR) recipe: colour distortion strength 0.5, no blur. (Strength 1,
        # its ImageNet value, leaves too little to match on these tiny images in a short run.) SupCon's
        # code crops from 0.2 of the area, SimCLR's from 0.08.
        scale = min_scale or (0.2 if method == "supcon" else 0.08)
        return [ViewRecipe(size, scale, jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0)] * 2
    # MoCo v2 (and SimSiam, which reuses it): SimCLR's recipe with jitter (0.4, 0.4, 0.4, 0.1), crops
    # from 0.2 of the area as both papers' code has them.
    return [ViewRecipe(size, min_scale or 0.2)] * 2


def eval_transform(size: int) -> T.Compose:
    """Frozen-feature evaluation: resize and centre crop, no augmentation."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
