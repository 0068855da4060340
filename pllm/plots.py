"""Plots a person would rather look at than read: training loss and validation ELBO curves."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(history: list[dict[str, float]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_elbo_nats"]) for h in history if "val_elbo_nats" in h]
    # SFT runs report their own loss: per response token of an example, averaged over examples.
    sft_val = [(h["step"], h["val_sft_loss"]) for h in history if "val_sft_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (SFT loss)" if sft_val else "train loss (NELBO/token)")
    if val:
        ax.plot(*zip(*val), "o-", label="validation NELBO/token")
    if sft_val:
        ax.plot(*zip(*sft_val), "o-", label="held-out SFT loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per (response) token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
