"""The token dataset on Ray Data: corpus files -> decode -> tokenize (HF tokenizers, batched) -> pack
into fixed rows of `seq_len` tokens with EOS between documents, streamed into Ray Train workers.
(Which files, and the train/validation split, come from `pllm.corpus_files.plan_corpus`.)

Nothing is materialised: each worker pulls its shard (`get_dataset_shard`) batch by batch through
`iter_batches`. Order is deterministic for a seed: files are read in an order shuffled with
the seed (with `preserve_order`), and each epoch shuffles rows in a local buffer seeded with
(seed, epoch).

The driver reads a prefix of a dataset (validation rows, the baseline's sample, the tokenizer's
sample) in rounds of whole datasets over growing groups of files, never with `limit` or by leaving
an iterator early: either stops a streaming read with tasks in flight, Ray cancels them, and a task
cancelled while it stores its output can log `TypeError: 'Handlers' object is not callable` (Ray's
DeferSigint, on leaving, calls the saved SIGINT handler, which may be the non-callable SIG_DFL):
an ERROR line in the log of a run that went fine.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import ray.data
import torch

from pllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FILES_PER_BLOCK = 16  # files packed by one read task
ROW_COLUMNS = ("input_ids", "response_mask", "segment_ids")  # what a training row may carry


# -- Ray Data stages ------------------------------------------------------------------------------
def _decode(batch: dict, text_field: str) -> list[str]:
    """bytes of text/jsonl files -> documents. Undecodable files and malformed lines are dropped
    with a count in the logs (remote files are only checked here)."""
    texts, bad = [], 0
    for raw, path in zip(batch["bytes"], batch["path"]):
        try:
            text = bytes(raw).decode("utf-8")
            if "\x00" in text:
                raise ValueError("binary content")
        except ValueError:
            bad += 1
            continue
        if path.endswith(".jsonl"):
            for line in text.splitlines():
                try:
                    doc = json.loads(line).get(text_field) if line.strip() else None
                except (ValueError, AttributeError):
                    doc = None
                if isinstance(doc, str) and doc:
                    texts.append(doc)
        elif text.strip():
            texts.append(text)
    if bad:
        log.warning("skipped %d undecodable corpus file(s) in this block", bad)
    return texts


def _decode_documents(batch: dict, text_field: str) -> dict:
    return {"text": np.array(_decode(batch, text_field), dtype=object)}


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_json(tokenizer_json)


def _pack(texts: list[str], tokenizer_json: str, seq_len: int) -> dict:
    """Documents -> one EOS-joined stream -> rows of seq_len tokens. The tail shorter than a row is
    dropped rather than padded (at most seq_len - 1 tokens per block of files)."""
    tok = _tokenizer(tokenizer_json)
    ids = [np.asarray(x, dtype=np.int32) for x in tok.iter_token_ids(texts)]
    stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    n = stream.size // seq_len
    return {"input_ids": stream[: n * seq_len].reshape(n, seq_len)}


def _decode_and_pack(batch: dict, text_field: str, tokenizer_json: str, seq_len: int) -> dict:
    return _pack(_decode(batch, text_field), tokenizer_json, seq_len)


def _pack_column(batch: dict, text_field: str, tokenizer_json: str, seq_len: int) -> dict:
    texts = [t for t in batch[text_field] if isinstance(t, str) and t]
    return _pack(texts, tokenizer_json, seq_len)


def _split(files: list[str]) -> tuple[list[str], list[str]]:
    """(text and jsonl files, parquet files)"""
    return [f for f in files if not f.endswith(".parquet")], [f for f in files if f.endswith(".parquet")]


def documents(files: list[str], text_field: str) -> ray.data.Dataset:
    """One row per document (column `text`), in file order."""
    other, parquet = _split(files)
    parts = []
    if other:
        ds = ray.data.read_binary_files(other, include_paths=True)
        parts.append(ds.map_batches(_decode_documents, fn_kwargs={"text_field": text_field}, batch_size=16))
    if parquet:
        ds = ray.data.read_parquet(parquet).select_columns([text_field]).rename_columns({text_field: "text"})
        parts.append(ds.filter(lambda row: isinstance(row["text"], str) and bool(row["text"])))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def token_rows(files: list[str], tokenizer: Tokenizer, seq_len: int, text_field: str = "text",
               seed: int | None = None, files_per_block: int = FILES_PER_BLOCK) -> ray.data.Dataset:
    """Packed rows {"input_ids": int32[seq_len]}.

    With a seed the files are read in a shuffled order (a global block shuffle would be an
    all-to-all stage that holds the whole corpus). Each read task takes a fixed group of
    `files_per_block` consecutive files and packs them in one call, so the rows depend only on the
    file order, never on how the streaming executor happens to batch blocks."""
    if seed is not None:
        files = shuffled_files(files, seed)
    other, parquet = _split(files)
    kwargs = {"text_field": text_field, "tokenizer_json": tokenizer.to_json(), "seq_len": seq_len}
    parts = []
    if other:
        ds = ray.data.read_binary_files(other, include_paths=True,
                                        override_num_blocks=math.ceil(len(other) / files_per_block))
        parts.append(ds.map_batches(_decode_and_pack, fn_kwargs=kwargs, batch_size=None, batch_format="numpy"))
    if parquet:
        ds = ray.data.read_parquet(parquet, override_num_blocks=len(parquet)).select_columns([text_field])
        parts.append(ds.map_batches(_pack_column, fn_kwargs=kwargs, batch_size=None, batch_format="numpy"))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def shuffled_files(files: list[str], seed: int) -> list[str]:
    """The order `token_rows(files, ..., seed=seed)` reads files in."""
    files = sorted(files)
    random.Random(seed).shuffle(files)
    return files


def file_rounds(files: list[str], first: int = 4 * FILES_PER_BLOCK) -> Iterator[list[str]]:
    """Consecutive groups of files, doubling in size, each a multiple of FILES_PER_BLOCK long: read
    round by round, files pack in the same blocks as in one read of them all whenever that read's
    blocks hold FILES_PER_BLOCK files each (a file count that is a multiple of it)."""
    start, size = 0, first
    while start < len(files):
        yield files[start : start + size]
        start, size = start + size, 2 * size


def first_rows(files: list[str], tokenizer: Tokenizer, seq_len: int, text_field: str, n: int) -> np.ndarray:
    """The first `n` packed rows of `files` (in the given order), int32 (<= n, seq_len). Each round's
    dataset is read to its end (see the module docstring for why not `limit`)."""
    parts, have = [], 0
    for group in file_rounds(files):
        for batch in token_rows(group, tokenizer, seq_len, text_field).iter_batches(batch_size=1024,
                                                                                   batch_format="numpy"):
            parts.append(batch["input_ids"])
            have += len(batch["input_ids"])
        if have >= n:
            break
    rows = np.concatenate(parts) if parts else np.zeros((0, seq_len), dtype=np.int32)
    return rows[:n]


def round_documents(files: list[str], text_field: str) -> Iterator[str]:
    """Documents of `files` in order, read round by round (`file_rounds`), each round to its end: a
    consumer that stops early (`documents_until`) leaves no read task to cancel."""
    for group in file_rounds(files):
        yield from [row["text"] for row in documents(group, text_field).iter_rows()]


# -- worker side ----------------------------------------------------------------------------------
class ShardBatches:
    """A worker's dataset shard as re-iterable epochs of {"input_ids": LongTensor (B, L)} batches
    (and, for SFT rows, their "response_mask" and "segment_ids": `pllm.pipelines.sft_dataset`).

    Rows pass through a shuffle buffer driven by a generator seeded with (seed, epoch); `set_epoch`
    (called by the trainer) picks the epoch. The buffer is ours rather than Ray Data's local shuffle
    because that one's output depends on when blocks arrive; this one depends only on the row order."""

    def __init__(self, shard, batch_size: int, seed: int | None, shuffle_buffer_rows: int = 0):
        self.shard, self.batch_size, self.seed = shard, batch_size, seed
        self.shuffle_buffer_rows, self.epoch = shuffle_buffer_rows, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self):
        for batch in self.shard.iter_batches(batch_size=256, batch_format="numpy"):
            columns = [k for k in ROW_COLUMNS if k in batch]
            # Copies: the buffer owns the rows it holds.
            yield from (dict(zip(columns, row)) for row in zip(*(np.array(batch[k], copy=True) for k in columns)))

    def _shuffled(self, rows):
        n = self.shuffle_buffer_rows
        if self.seed is None or n <= 1:
            yield from rows
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        buffer = []
        for row in rows:
            if len(buffer) < n:
                buffer.append(row)
                continue
            i = int(rng.integers(n))
            yield buffer[i]
            buffer[i] = row
        for i in rng.permutation(len(buffer)):
            yield buffer[i]

    def __iter__(self):
        batch = []
        for row in self._shuffled(self._rows()):
            batch.append(row)
            if len(batch) == self.batch_size:
                yield {k: torch.from_numpy(np.stack([row[k] for row in batch]).astype(np.int64)) for k in batch[0]}
                batch = []  # a last partial batch is dropped: every rank takes the same number of steps
