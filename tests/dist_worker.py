"""A training run on one rank of a gloo process group, started by tests through torch.multiprocessing
(what `torchrun` would do): the same DistributedTrainer, a strategy picked from the config."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def rows(step: int, micro: int, global_batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """The global micro-batch for (step, micro): learnable (each row repeats a short random motif)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    motif = torch.randint(4, vocab, (global_batch, 8), generator=g)
    return motif.repeat(1, seq_len // 8)


class RankBatches:
    """This rank's slice of every global micro-batch, in order (a stand-in for a sharded loader)."""

    def __init__(self, rank, world, batch, seq_len, vocab, steps, accum):
        self.args = rank, world, batch, seq_len, vocab, steps * accum

    def __iter__(self):
        rank, world, batch, seq_len, vocab, n = self.args
        for i in range(n):
            yield rows(i // 1000, i, batch * world, seq_len, vocab)[rank * batch : (rank + 1) * batch]


def run(rank: int, world: int, port: int, train_kwargs: dict, out: str, load: str | None, save: str | None,
        stop_at: int | None = None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from conftest import tiny_config
    from pllm import DiffusionTransformer, DistributedTrainer, TrainingConfig

    cfg = TrainingConfig(**train_kwargs)
    torch.manual_seed(0)  # identical initial weights on every rank and in the reference run
    model = DiffusionTransformer(tiny_config())
    data = RankBatches(rank, world, cfg.batch_size, cfg.seq_len, 96, cfg.num_train_steps,
                       cfg.gradient_accumulation_steps)
    trainer = DistributedTrainer(model, cfg, train_dataloader=data, device="cpu", show_progress=False)
    if load:
        trainer.load_checkpoint(load)
    if stop_at:  # interrupt the run (same schedule, fewer steps)
        trainer.cfg = cfg.replace(num_train_steps=stop_at)
    trainer.train()
    if save:
        trainer.save_checkpoint(save)
    final = trainer.consolidated_model()
    if rank == 0:
        losses = {int(h["step"]): h["loss"] for h in trainer.history if "loss" in h}
        weight_norm = float(sum(p.detach().double().pow(2).sum() for p in final.parameters()).sqrt())
        # ZeRO-3 keeps parameters at or below stage3_param_persistence_threshold whole on every rank.
        persist = [p.ds_persist for p in trainer.strategy.module.parameters() if hasattr(p, "ds_persist")]
        json.dump({"losses": losses, "strategy": trainer.strategy.name, "step": trainer.step,
                   "zero3_params": len(persist), "zero3_persistent_params": sum(persist),
                   "optimizer_steps": trainer.strategy.optimizer_steps(), "weight_norm": weight_norm,
                   "float8_layers": sum(type(m).__name__ == "Float8Linear" for m in trainer.strategy.module.modules())},
                  open(out, "w"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    # Skip interpreter teardown: DeepSpeed's background threads can abort it ("terminate called
    # without an active exception") after all work is done and written.
    os._exit(0)
