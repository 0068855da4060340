"""Instruction fine-tuning of a masked-diffusion model: examples to rows, and the loss.

LLaDA's SFT recipe (Nie et al. 2025, sec. 2.3): a row is prompt + response, the response followed
by eos up to the row's length (those eos count as response: the model learns where to stop). The
prompt is never masked; each response token is masked with probability 1 - alpha(t), and the loss
is the masked tokens' cross-entropy weighted by the ELBO weight, divided by the row's response
length, averaged over rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from .diffusion import DiffusionLoss, NoiseSchedule, masked_positions, sample_t, to_device
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class SFTRow:
    input_ids: list[int]  # prompt + response + eos padding, exactly seq_len tokens
    prompt_length: int


def _prompt_and_response(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """The messages before the answer, and the answer, of a `messages` or `prompt`/`response` row."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        if messages[-1].get("role") != "assistant":
            raise ValueError("the last message must be the assistant's response")
        return messages[:-1], messages[-1].get("content")
    if "prompt" not in row or "response" not in row:
        raise ValueError(f"a row needs 'messages' or 'prompt' and 'response' fields, got {sorted(row)}")
    return [{"role": "user", "content": row["prompt"]}], row["response"]


def encode_example(tokenizer: Tokenizer, row: dict[str, Any], seq_len: int) -> SFTRow | str:
    """One row of seq_len tokens, or the reason it is skipped ("empty response", "prompt too long").
    The prompt goes through the tokenizer's chat template when it has one. A response longer than
    the row is cut (its last token is still eos)."""
    context, response = _prompt_and_response(row)
    if not isinstance(response, str) or not response.strip():
        return "empty response"
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True)
    else:
        prompt = tokenizer.encode("\n".join(m["content"] for m in context) + "\n")
    if len(prompt) >= seq_len:
        return "prompt too long"
    answer = tokenizer.encode(response)[:seq_len - len(prompt) - 1] + [tokenizer.eos_token_id]
    ids = prompt + answer
    return SFTRow(ids + [tokenizer.eos_token_id] * (seq_len - len(ids)), len(prompt))


def encode_examples(tokenizer: Tokenizer, rows: list[dict[str, Any]], seq_len: int) -> tuple[list[SFTRow], Counter]:
    """Rows that fit, and how many were skipped for each reason."""
    kept, skipped = [], Counter()
    for row in rows:
        out = encode_example(tokenizer, row, seq_len)
        if isinstance(out, str):
            skipped[out] += 1
        else:
            kept.append(out)
    return kept, skipped


def sft_loss(model: torch.nn.Module, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, schedule: NoiseSchedule,
             mask_token_id: int, t: torch.Tensor | None = None, eps: float = 1e-3,
             generator: torch.Generator | None = None, mask_draw: torch.Tensor | None = None) -> DiffusionLoss:
    """One Monte-Carlo sample of the SFT loss for rows (B, L) whose first prompt_lengths (B,) tokens
    are the prompt. `loss` is what to backpropagate; `nelbo_sum` the weighted sum before dividing
    by response lengths; num_tokens counts response tokens."""
    B, L = input_ids.shape
    device = input_ids.device
    noise = next((x.device for x in (mask_draw, generator, t) if x is not None), torch.device("cpu"))
    prompt_lengths = prompt_lengths.to(noise)
    response = torch.arange(L, device=noise)[None, :] >= prompt_lengths[:, None]  # (B, L)
    if t is None:
        t = sample_t(B, eps, generator, device=noise)
    t = t.to(noise)
    is_masked = masked_positions(t, schedule, response, generator, mask_draw)
    index = is_masked.flatten().nonzero().squeeze(1)
    lengths = (L - prompt_lengths).to(torch.float32)  # response + eos padding
    weight = (schedule.elbo_weight(t) / lengths)[:, None].expand(B, L).flatten()[index]
    is_masked, index, weight = (to_device(x, device) for x in (is_masked, index, weight))
    x_t = torch.where(is_masked, mask_token_id, input_ids)
    total = model(x_t, logits_mask=index, loss_targets=input_ids.flatten()[index], loss_weights=weight)
    return DiffusionLoss(total / B, total.detach(), int(response.sum()), int(index.numel()))
