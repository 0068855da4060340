"""SFT rows on Ray Data: jsonl / parquet rows (`messages`, or `prompt` and `response`) -> the
checkpoint's chat template and tokenizer -> rows of seq_len tokens (one example padded with eos,
LLaDA's recipe, or several packed) with their response mask and segment ids, streamed into the
Ray Train workers like the pretraining rows (`pllm.pipelines.token_dataset`).

Tokenizing happens in Ray Data tasks. Rows that cannot be used (no response, an empty one, a prompt
longer than the row, a line that is not JSON) are counted by reason, not fatal: the driver logs
the counts and fails, naming them, only when no row is left. The held-out split is by a hash of
each row (`pllm.sft.row_bucket`), the same as the in-process job's.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pllm.sft import PackedRow, SFTRow, encode_example, pack_examples, row_bucket
from pllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PACK_GROUP = 1024  # examples one task packs together (greedy, in order)


@lru_cache(maxsize=4)
def _tokenizer(text: str) -> Tokenizer:
    return Tokenizer.from_json(text)


def _parse(line: str) -> dict | str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return "not a JSON object"
    return row if isinstance(row, dict) else "not a JSON object"


def _encode(batch: dict, tokenizer_json: str, seq_len: int, pad: bool, held_out: float) -> dict:
    """Raw rows (JSON text) -> one record each: the example's tokens and prompt length, whether it
    is held out, and why it is skipped ("" if it is not)."""
    tokenizer = _tokenizer(tokenizer_json)
    ids, prompts, held, skip = [], [], [], []
    for text in batch["row"]:
        row = _parse(str(text))
        out = row
        if isinstance(row, dict):
            row = {k: v for k, v in row.items() if v is not None}  # parquet fills absent fields with nulls
            try:
                out = encode_example(tokenizer, row, seq_len, pad)
            except ValueError as exc:
                out = str(exc)
        ok = isinstance(out, SFTRow)
        ids.append(np.asarray(out.input_ids if ok else [], dtype=np.int32))
        prompts.append(out.prompt_length if ok else 0)
        held.append(isinstance(row, dict) and row_bucket(row) < held_out)
        skip.append("" if ok else out)
    column = np.empty(len(ids), dtype=object)
    column[:] = ids
    return {"ids": column, "prompt_length": np.asarray(prompts, dtype=np.int32),
            "held_out": np.asarray(held, dtype=bool), "skip": np.asarray(skip, dtype=object)}


def _rows(batch: dict, seq_len: int, pad: bool, pad_token_id: int) -> dict:
    """Encoded examples -> training rows with response masks and segment ids (packed unless pad)."""
    examples = [SFTRow([int(t) for t in ids], int(p)) for ids, p in zip(batch["ids"], batch["prompt_length"])]
    if pad:
        rows = [PackedRow(e.input_ids, [0] * seq_len, [i >= e.prompt_length for i in range(seq_len)])
                for e in examples]
    else:
        rows = pack_examples(examples, seq_len, pad_token_id)
    return {"input_ids": np.array([r.input_ids for r in rows], dtype=np.int32).reshape(-1, seq_len),
            "response_mask": np.array([r.response_mask for r in rows], dtype=np.int8).reshape(-1, seq_len),
            "segment_ids": np.array([r.segment_ids for r in rows], dtype=np.int32).reshape(-1, seq_len)}


def raw_rows(files: list):
    """A dataset with one column "row": each SFT row as JSON text (jsonl lines, parquet rows)."""
    import ray.data

    files, parts = [str(f) for f in files], []
    jsonl = [f for f in files if not f.endswith(".parquet")]
    parquet = [f for f in files if f.endswith(".parquet")]
    if jsonl:
        lines = ray.data.read_text(jsonl, drop_empty_lines=True)
        parts.append(lines.map_batches(lambda b: {"row": np.asarray(b["text"], dtype=object)}, batch_format="numpy"))
    if parquet:
        def to_json(table):
            return {"row": np.asarray([json.dumps(r, default=str) for r in table.to_pylist()], dtype=object)}

        parts.append(ray.data.read_parquet(parquet).map_batches(to_json, batch_format="pyarrow"))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def builtin_rows():
    """The built-in instruction set (`pllm.instructions`) as raw rows."""
    import ray.data

    from pllm.instructions import instruction_dataset

    train, held = instruction_dataset()
    return ray.data.from_items([{"row": json.dumps({"messages": e.messages()})} for e in train + held])


@dataclass
class SFTDatasets:
    train: object  # ray.data.Dataset of training rows (input_ids, response_mask, segment_ids)
    val: object  # ray.data.Dataset of the held-out rows the evaluations use
    train_examples: int
    val_examples: int
    skipped: dict[str, int]


def sft_datasets(raw, tokenizer: Tokenizer, seq_len: int, packing: bool, held_out: float,
                 val_rows: int) -> SFTDatasets:
    """Encode and split the raw rows (the encoded examples are materialised: a count per skip reason
    and per split is needed before training starts; they are token ids, far smaller than text),
    then make training and validation rows (at most val_rows of them)."""
    pad = not packing
    encoded = raw.map_batches(_encode, fn_kwargs={"tokenizer_json": tokenizer.to_json(), "seq_len": seq_len,
                                                  "pad": pad, "held_out": held_out},
                              batch_format="numpy").materialize()
    counts = Counter()
    for batch in encoded.select_columns(["skip", "held_out"]).iter_batches(batch_format="numpy", batch_size=4096):
        counts.update(("skip", s) if s else ("held_out" if h else "train", "") for s, h in
                      zip(batch["skip"], batch["held_out"]))
    skipped = {k[1]: n for k, n in counts.items() if k[0] == "skip"}
    n_train, n_val = counts[("train", "")], counts[("held_out", "")]
    if skipped:
        log.info("SFT rows skipped: %s", skipped)
    if not n_train or not n_val:
        part = "training" if not n_train else "held-out"
        raise ValueError(f"no {part} SFT row fits training.seq_len={seq_len} (rows kept: {n_train} training, "
                         f"{n_val} held out; skipped: {skipped or 'none'}; data.validation_fraction={held_out})")
    kept = encoded.filter(lambda r: not r["skip"])

    def rows(held: bool):
        part = kept.filter(lambda r: bool(r["held_out"]) == held).drop_columns(["skip", "held_out"])
        return part.map_batches(_rows, fn_kwargs={"seq_len": seq_len, "pad": pad,
                                                  "pad_token_id": tokenizer.pad_token_id},
                                batch_size=PACK_GROUP, batch_format="numpy")

    val = rows(True).materialize()
    if val.count() > val_rows:
        val = val.limit(val_rows).materialize()  # a materialised dataset: no read task to cancel
    log.info("SFT: %d training and %d held-out examples (%s)", n_train, n_val,
             "packed" if packing else "one a row, padded with eos")
    return SFTDatasets(rows(False), val, n_train, n_val, skipped)
