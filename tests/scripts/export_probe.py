"""Run under torchrun: for each ZeRO stage asked for, train a few steps with the real Trainer,
export, and save the live model's embeddings of a fixed probe batch, so a test can compare them
with the export. One launch covers every stage (process start-up is most of the cost)."""

import contextlib
import sys
from pathlib import Path

import torch

from training import config, distributed
from training.trainer import Trainer


def probe(trainer: Trainer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = trainer.image_size
    images = torch.randn(4, 3, size, size, generator=g)
    texts = trainer.tokenizer(["a red circle", "a big blue star in the top left corner", "green", ""])
    module = trainer.engine.module
    module.eval()
    if trainer.cfg.train.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()))
    else:
        gather = contextlib.nullcontext()
    with torch.no_grad(), gather:
        return {"images": images, "texts": texts, "image": module.encode_image(images, normalize=True),
                "text": module.encode_text(texts, normalize=True)}


if __name__ == "__main__":
    out, stages, *overrides = sys.argv[1:]
    distributed.init()
    for stage in stages.split(","):
        run_dir = Path(out) / f"stage{stage}"
        cfg = config.load(None, [*overrides, f"train.zero_stage={stage}", f'train.run_dir="{run_dir}"'])
        trainer = Trainer(cfg)
        trainer.build()
        trainer.fit()
        emb = probe(trainer)
        if distributed.is_main():
            torch.save(emb, run_dir / "probe.pt")
        distributed.barrier()
    distributed.shutdown()
