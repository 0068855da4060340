"""Instruction fine-tuning of a masked-diffusion model: examples to rows, and the loss.

LLaDA's SFT recipe (Nie et al. 2025, sec. 2.3): a row is prompt + response, the response followed
by eos up to the row's length (those eos count as response: the model learns where to stop). The
prompt is never masked; each response token is masked with probability 1 - alpha(t), and the loss
is the masked tokens' cross-entropy weighted by the ELBO weight, divided by the row's response
length, averaged over rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .diffusion import DiffusionLoss, NoiseSchedule, masked_positions, sample_t, to_device
from .tokenizer import Tokenizer


NO_FIELDS = "no 'messages' nor 'prompt' and 'response' fields"


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
        raise ValueError(NO_FIELDS)
    return [{"role": "user", "content": row["prompt"]}], row["response"]


def prompt_ids(tokenizer: Tokenizer, context: list[dict[str, str]]) -> list[int]:
    """The tokens before an answer: the chat template's rendering with the assistant's turn opened,
    or (a tokenizer without a template) the messages' contents one a line."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True)
    return tokenizer.encode("\n".join(m["content"] for m in context) + "\n")


def encode_example(tokenizer: Tokenizer, row: dict[str, Any], seq_len: int, pad: bool = True) -> SFTRow | str:
    """One example's tokens: prompt + response + eos, padded with eos to seq_len (pad, LLaDA's
    recipe) or not (for packing); or the reason it is skipped ("empty response", "prompt too
    long"). The prompt goes through the tokenizer's chat template when it has one. A response
    longer than the row is cut (its last token is still eos)."""
    context, response = _prompt_and_response(row)
    if not isinstance(response, str) or not response.strip():
        return "empty response"
    prompt = prompt_ids(tokenizer, context)
    if len(prompt) >= seq_len:
        return "prompt too long"
    answer = tokenizer.encode(response)[:seq_len - len(prompt) - 1] + [tokenizer.eos_token_id]
    ids = prompt + answer
    return SFTRow(ids + [tokenizer.eos_token_id] * (seq_len - len(ids)) if pad else ids, len(prompt))


@dataclass(frozen=True)
class PackedRow:
    """Examples packed end to end in one row of seq_len tokens (`pack_examples`)."""

    input_ids: list[int]
    segment_ids: list[int]  # example k's tokens carry k; the unused tail its own id
    response_mask: list[bool]  # the tokens the loss covers: each example's response and its eos


def pack_examples(rows: list[SFTRow], seq_len: int, pad_token_id: int) -> list[PackedRow]:
    """Unpadded examples (`encode_example(..., pad=False)`) packed greedily, in order, into rows;
    the model keeps them apart with segment_ids, so no example attends to another."""
    out, ids, segs, resp = [], [], [], []

    def flush():
        if ids:
            tail = seq_len - len(ids)
            out.append(PackedRow(ids + [pad_token_id] * tail, segs + [segs[-1] + 1] * tail, resp + [False] * tail))

    for row in rows:
        if len(ids) + len(row.input_ids) > seq_len:
            flush()
            ids, segs, resp = [], [], []
        k = segs[-1] + 1 if segs else 0
        n = len(row.input_ids)
        ids += row.input_ids
        segs += [k] * n
        resp += [i >= row.prompt_length for i in range(n)]
    flush()
    return out


def encode_examples(tokenizer: Tokenizer, rows: list[dict[str, Any]], seq_len: int,
                    pad: bool = True) -> tuple[list[SFTRow], Counter]:
    """Rows that fit, and how many were skipped for each reason ("empty response", "prompt too
    long", a row without the fields or with malformed messages: the reason says which)."""
    kept, skipped = [], Counter()
    for row in rows:
        try:
            out = encode_example(tokenizer, row, seq_len, pad)
        except ValueError as exc:
            out = str(exc)
        if isinstance(out, str):
            skipped[out] += 1
        else:
            kept.append(out)
    return kept, skipped


def sft_loss(model: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor, schedule: NoiseSchedule,
             mask_token_id: int, segment_ids: torch.Tensor | None = None, t: torch.Tensor | None = None,
             eps: float = 1e-3, generator: torch.Generator | None = None,
             mask_draw: torch.Tensor | None = None) -> DiffusionLoss:
    """One Monte-Carlo sample of the SFT loss for rows (B, L): response_mask (B, L) marks the tokens
    the loss covers (the rest, prompts and padding, are never masked); segment_ids (B, L) separates
    packed examples (default: one example a row). Each example draws its own t (t: (B, E), column
    k for segment k, E at least the most segments of a row; or (B,) without packing); its masked
    tokens' weighted cross-entropy is divided by its response length, and `loss` averages over
    examples. `nelbo_sum` is that weighted sum before the average;
    num_tokens counts response tokens."""
    B, L = input_ids.shape
    device = input_ids.device
    noise = next((x.device for x in (mask_draw, generator, t) if x is not None), torch.device("cpu"))
    response = response_mask.to(noise).bool()
    segments = torch.zeros(B, L, dtype=torch.long, device=noise) if segment_ids is None else segment_ids.to(noise)
    per_row = int(segments.max()) + 1
    example = torch.arange(B, device=noise)[:, None] * per_row + segments  # (B, L) a global example index
    if t is None:
        t = sample_t(B * per_row, eps, generator, device=noise).view(B, per_row)
    t = t.to(noise).view(B, -1)
    lengths = torch.bincount(example[response], minlength=B * per_row).to(torch.float32)
    num_examples = int((lengths > 0).sum())
    t_pos = t.gather(1, segments)  # (B, L): each token its example's t
    is_masked = masked_positions(t_pos, schedule, response, generator, mask_draw)
    index = is_masked.flatten().nonzero().squeeze(1)
    weight = (schedule.elbo_weight(t_pos) / lengths[example].clamp(min=1)).flatten()[index]
    is_masked, index, weight = (to_device(x, device) for x in (is_masked, index, weight))
    x_t = torch.where(is_masked, mask_token_id, input_ids)
    packed = {} if segment_ids is None else {"segment_ids": to_device(segment_ids, device)}
    total = model(x_t, logits_mask=index, loss_targets=input_ids.flatten()[index], loss_weights=weight, **packed)
    return DiffusionLoss(total / max(num_examples, 1), total.detach(), int(response.sum()), int(index.numel()))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[SFTRow] | list[PackedRow]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        ids = torch.tensor(row.input_ids)
        if isinstance(row, PackedRow):
            return {"input_ids": ids, "response_mask": torch.tensor(row.response_mask),
                    "segment_ids": torch.tensor(row.segment_ids)}
        response = torch.arange(len(row.input_ids)) >= row.prompt_length
        return {"input_ids": ids, "response_mask": response, "segment_ids": torch.zeros_like(ids)}


def sft_dataloader(rows: list[SFTRow] | list[PackedRow], batch_size: int, shuffle: bool,
                   seed: int = 0) -> torch.utils.data.DataLoader:
    """Batches of {input_ids, response_mask, segment_ids}, which `DistributedTrainer` trains on
    with `sft_loss` (a batch with a response_mask is an SFT batch)."""
    return torch.utils.data.DataLoader(_Rows(rows), batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate_sft(model: torch.nn.Module, batches, schedule: NoiseSchedule, mask_token_id: int, seed: int = 1234,
                 autocast=None, reduce=None) -> dict[str, float]:
    """The mean SFT loss over these batches with fixed noise (comparable across evaluations)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total, examples = 0.0, 0
    for batch in batches:
        segments = batch["segment_ids"]
        with autocast() if autocast else contextlib.nullcontext():
            out = sft_loss(model, to_device(batch["input_ids"], device), batch["response_mask"], schedule,
                           mask_token_id, segment_ids=segments if bool(segments.any()) else None, generator=generator)
        n = _examples(batch)
        total += float(out.loss) * n
        examples += n
    model.train(was_training)
    if reduce is not None:
        total, examples = reduce([total, float(examples)])
    if examples == 0:
        raise ValueError("evaluate_sft got no examples: is the validation set empty?")
    return {"val_sft_loss": total / examples}


def _examples(batch: dict[str, torch.Tensor]) -> int:
    """Examples with a response in a batch (a packed row holds several)."""
    segments, response = batch["segment_ids"], batch["response_mask"].bool()
    per_row = int(segments.max()) + 1
    example = torch.arange(segments.shape[0])[:, None] * per_row + segments
    return int(torch.unique(example[response]).numel())


def read_rows(paths: list[str | Path]) -> list[dict[str, Any]]:
    """SFT rows from .jsonl files (one JSON object a line) and .parquet files (one row each)."""
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(path).to_pylist()
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def row_bucket(row: dict[str, Any]) -> float:
    """A number in [0, 1) from the row's content: held out below data.validation_fraction."""
    return int.from_bytes(hashlib.sha1(json.dumps(row, sort_keys=True).encode()).digest()[:8], "big") / 2**64


def split_rows(rows: list[dict[str, Any]], held_out: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows), by a hash of each row: the same split on every machine."""
    val = [r for r in rows if row_bucket(r) < held_out]
    train = [r for r in rows if row_bucket(r) >= held_out]
    if not train or not val:
        raise ValueError(f"{len(rows)} SFT rows give an empty {'training' if not train else 'held-out'} split "
                         f"(data.validation_fraction={held_out})")
    return train, val
