"""A user's training script as the seed README launches it (`torchrun --nproc_per_node=N script.py`):
no process-group code of its own; DistributedTrainer joins the group torchrun describes."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_worker  # noqa: E402  (the same data and model as the strategies tests)
from conftest import tiny_config  # noqa: E402

from pllm import DiffusionTransformer, DistributedTrainer, TrainingConfig  # noqa: E402


def main(out: str, kwargs: str) -> None:
    torch.set_num_threads(1)
    cfg = TrainingConfig(**json.loads(kwargs))
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    data = dist_worker.RankBatches(rank, world, cfg.batch_size, cfg.seq_len, 96, cfg.num_train_steps,
                                   cfg.gradient_accumulation_steps)
    trainer = DistributedTrainer(model, cfg, train_dataloader=data, device="cpu", show_progress=False)
    trainer.train()
    trainer.save_checkpoint(os.path.join(os.path.dirname(out), "ckpt"))
    if trainer.strategy.is_main:
        losses = {int(h["step"]): h["loss"] for h in trainer.history if "loss" in h}
        json.dump({"losses": losses, "strategy": trainer.strategy.name, "world_size": trainer.strategy.world_size},
                  open(out, "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
