"""Run under torchrun: train a few ZeRO steps with the real Trainer, export, and save the live
model's embeddings of a fixed probe batch so a test can compare them with the export."""

import sys
from pathlib import Path

import torch

from training import config, distributed
from training.trainer import Trainer

if __name__ == "__main__":
    out, *overrides = sys.argv[1:]
    cfg = config.load(None, overrides)
    distributed.init()
    trainer = Trainer(cfg)
    trainer.build()
    trainer.fit()
    g = torch.Generator().manual_seed(0)
    size = trainer.image_size
    images = torch.randn(4, 3, size, size, generator=g)
    texts = trainer.tokenizer(["a red circle", "a big blue star in the top left corner", "green", ""])
    module = trainer.engine.module
    module.eval()
    with torch.no_grad():
        if cfg.train.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()))
        else:
            import contextlib

            gather = contextlib.nullcontext()
        with gather:
            emb = {"images": images, "texts": texts, "image": module.encode_image(images, normalize=True),
                   "text": module.encode_text(texts, normalize=True)}
    if distributed.is_main():
        torch.save(emb, Path(out))
    distributed.barrier()
