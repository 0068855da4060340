"""A small instruction dataset made here, without the network: question/answer pairs about the
built-in corpus (the standard library's own sources) and arithmetic. SFT tests, the demo and the
before/after evaluation of fine-tuning use it.

- "returns": "In the Python module `json.decoder`, what does the function `f` return?" answered
  with the expression of the function's only `return` statement;
- "arithmetic": sums and products of small numbers, answered with the number.

The split into training and held-out examples is by a hash of the question, so it is the same on
every machine and every run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .corpus_files import builtin_corpus_files

MAX_ANSWER_CHARS = 60  # a returned expression longer than this makes a poor exact-match target


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    kind: str  # "returns" | "arithmetic"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


def function_return_examples(files: list[Path], limit: int | None = None) -> list[Example]:
    """One example per top-level function whose body has exactly one `return <expression>`."""
    out: list[Example] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # test data in the standard library includes deliberately broken files
        module = _module_name(path)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            if len(returns) != 1 or returns[0].value is None:
                continue
            expression = ast.get_source_segment(source, returns[0].value)
            if not expression or len(expression) > MAX_ANSWER_CHARS or "\n" in expression:
                continue
            out.append(Example(f"In the Python module `{module}`, what does the function `{node.name}` return?",
                               f"`{node.name}` returns `{expression}`.", "returns"))
            if limit is not None and len(out) >= limit:
                return out
    return out


def arithmetic_examples(count: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            out.append(Example(f"What is {a} + {b}?", str(a + b), "arithmetic"))
        else:
            a, b = a % 13, b % 13
            out.append(Example(f"What is {a} times {b}?", str(a * b), "arithmetic"))
    return list(dict.fromkeys(out))  # repeated questions once


def is_held_out(example: Example, fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha1(example.prompt.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


def instruction_dataset(num_returns: int = 2000, num_arithmetic: int = 2000, held_out: float = 0.1,
                        seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) from the standard library and arithmetic."""
    examples = function_return_examples(builtin_corpus_files(), num_returns) + arithmetic_examples(num_arithmetic, seed)
    return ([e for e in examples if not is_held_out(e, held_out)], [e for e in examples if is_held_out(e, held_out)])


def answer_accuracy(model, tokenizer, examples: list[Example], generation=None,
                    engine_config=None) -> dict[str, float]:
    """How well a model answers instruction examples (the held-out ones, to judge fine-tuning):
    each prompt rendered as SFT renders it (`pllm.sft.prompt_ids`), answered by the engine (greedy
    by default), and compared with the reference: exact match (surrounding whitespace ignored),
    and the answer's form ("`f` returns `...`." for "returns", a bare number for "arithmetic"),
    overall and per kind."""
    from .config import GenerationConfig
    from .engine import Engine
    from .sft import prompt_ids

    answer_tokens = max(len(tokenizer.encode(e.response)) for e in examples) + 4
    blocks = model.config.block_size if model.config.attention_mode == "block_causal" else None
    # One token a step, greedy: the model's best answer, not a speed setting.
    generation = generation or GenerationConfig(max_new_tokens=answer_tokens, num_refinement_steps=answer_tokens,
                                                temperature=0.0, block_size=blocks)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": e.prompt}]) for e in examples]
    answers = [tokenizer.decode(ids).strip() for ids in Engine(model, engine_config).generate(prompts, generation)]
    scores: dict[str, list[tuple[bool, bool]]] = {}
    for e, answer in zip(examples, answers):
        scores.setdefault(e.kind, []).append((answer == e.response.strip(), _has_form(e, answer)))
    out = {"examples": float(len(examples))}
    for kind, marks in [("all", [m for ms in scores.values() for m in ms]), *sorted(scores.items())]:
        prefix = "" if kind == "all" else f"{kind}_"
        out[f"{prefix}exact_match"] = sum(m[0] for m in marks) / len(marks)
        out[f"{prefix}form_match"] = sum(m[1] for m in marks) / len(marks)
    return out


def _has_form(example: Example, answer: str) -> bool:
    if example.kind == "arithmetic":
        return answer.isdigit()
    name = example.response.split("`", 2)[1]
    return answer.startswith(f"`{name}` returns `") and answer.endswith("`.")


def write_jsonl(examples: list[Example], path: str | Path, chat: bool = True) -> Path:
    """One example per line: {"messages": [...]} (chat) or {"prompt": ..., "response": ...}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for e in examples:
            row = {"messages": e.messages()} if chat else {k: v for k, v in asdict(e).items() if k != "kind"}
            f.write(json.dumps(row) + "\n")
    return path


def _module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    # the dotted name from the standard library's root: .../lib/python3.11/json/decoder.py -> json.decoder
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("python3"):
            parts = parts[i + 1:]
            break
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or path.stem
