"""Quality measures for generated code: Python parse rate, generative perplexity under an
autoregressive model, and held-out prompts / infilling tasks cut from a corpus."""

from __future__ import annotations

import ast
import math
import random
import textwrap
from dataclasses import dataclass

import torch

from .model import DiffusionTransformer


def parses_as_python(text: str) -> bool:
    """Does the code parse, once cut to whole lines? A completion stops mid-function, so an open
    block at the end (a trailing `if x:` or `def f():`) is closed with `pass` before parsing."""
    text = textwrap.dedent(text[: text.rfind("\n") + 1] if "\n" in text else text)
    if not text.strip():
        return False
    for candidate in (text, _close_last_block(text)):
        try:
            ast.parse(candidate)
            return True
        except (SyntaxError, ValueError):
            continue
    return False


def _close_last_block(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1]
    indent = len(last) - len(last.lstrip())
    return text.rstrip("\n") + "\n" + " " * (indent + 4) + "pass\n"


@torch.no_grad()
def autoregressive_nll(model: DiffusionTransformer, prompt: torch.Tensor, completion: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of `completion` after `prompt` under a block-size-1
    block-diffusion model (an autoregressive LM), in one pass: every position masked in the noisy
    copy sees only the clean tokens before it. Returns (nll, number of tokens)."""
    cfg = model.config
    if cfg.attention_mode != "block_causal" or cfg.block_size != 1:
        raise ValueError("autoregressive_nll needs a block-causal model with block_size 1")
    if completion.numel() == 0:
        return 0.0, 0
    device = model.device
    clean = torch.cat([prompt, completion]).to(device)[None]
    noisy = torch.full_like(clean, cfg.mask_token_id)
    logits = model(noisy, clean_input_ids=clean)[0, prompt.numel():]
    nll = torch.nn.functional.cross_entropy(logits.float(), clean[0, prompt.numel():], reduction="sum")
    return float(nll), completion.numel()


def perplexity(total_nll: float, num_tokens: int) -> float:
    return math.exp(total_nll / max(num_tokens, 1))


@dataclass
class CodePrompt:
    prompt: list[int]  # context before the function + its first line(s)
    head: str  # the function's first line(s): the start of the text that must parse
    reference: list[int]  # the function's true continuation (tokens)


def function_prompts(sources: list[str], tokenizer, count: int, context_tokens: int, head_lines: int = 2,
                     continuation_tokens: int = 64, seed: int = 0) -> list[CodePrompt]:
    """Prompts from top-level functions of held-out files: up to `context_tokens` tokens of the file
    before the function, plus its first `head_lines` lines; the reference is what follows."""
    found = []
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 4:
                start = node.lineno - 1 - len(node.decorator_list)
                head = "".join(lines[start:start + head_lines])
                before = "".join(lines[:start])
                after = "".join(lines[start + head_lines:node.end_lineno])
                found.append((before, head, after))
    random.Random(seed).shuffle(found)
    prompts = []
    for before, head, after in found[:count]:
        context = tokenizer.encode(before)[-context_tokens:] if context_tokens else []
        prompts.append(CodePrompt(context + tokenizer.encode(head), head,
                                  tokenizer.encode(after)[:continuation_tokens]))
    return prompts


@dataclass
class InfillTask:
    prefix: list[int]
    span: list[int]  # the masked tokens to recover
    suffix: list[int]


def infill_tasks(tokens: list[list[int]], count: int, span: int, context: int, seed: int = 0) -> list[InfillTask]:
    """Masked spans of `span` tokens with `context` tokens on each side, from held-out token rows."""
    rng = random.Random(seed)
    rows = [t for t in tokens if len(t) >= span + 2 * context]
    tasks = []
    for _ in range(count):
        row = rng.choice(rows)
        start = rng.randrange(context, len(row) - span - context + 1)
        tasks.append(InfillTask(row[start - context:start], row[start:start + span],
                                row[start + span:start + span + context]))
    return tasks
