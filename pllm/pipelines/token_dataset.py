"""Ray Data corpus pipeline: read -> decode -> tokenize (HF tokenizers, batched) -> pack into fixed
rows of `seq_len` tokens with EOS between documents, streamed into Ray Train workers.

Nothing is materialised: each worker pulls its shard (`get_dataset_shard`) batch by batch through
`iter_batches`. Order is deterministic for a seed: files are read in an order shuffled with
the seed (with `preserve_order`), and each epoch shuffles rows in a local buffer seeded with
(seed, epoch). Paths are local files, folders, globs, or remote URIs (s3://, gs://, ... through
pyarrow filesystems); a path that matches nothing fails at once, before any Ray task starts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
import ray.data
import torch

from pllm.config import DataConfig
from pllm.corpus import DATA_SUFFIXES, TEXT_SUFFIXES, corpus_files, split_files
from pllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SNIFF_BYTES = 4096


# -- planning (driver side, no Ray) ---------------------------------------------------------------
@dataclass
class CorpusPlan:
    train_files: list[str]
    val_files: list[str]
    skipped: dict[str, int]  # reason -> count

    @property
    def key(self) -> str:
        """Identifies the file set (for the tokenizer cache)."""
        return hashlib.sha1(json.dumps([self.train_files, self.val_files]).encode()).hexdigest()[:16]


def _is_uri(spec: str) -> bool:
    return "://" in spec


def _remote_files(uri: str) -> list[str]:
    """Files under a remote URI: one file, a folder (recursively) or a folder/*.ext pattern."""
    import pyarrow.fs as pafs

    pattern = None
    if any(c in uri.rsplit("/", 1)[-1] for c in "*?["):
        uri, pattern = uri.rsplit("/", 1)
    fs, root = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(root)
    scheme = uri.split("://", 1)[0]
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"corpus path {uri!r} matches no file or folder")
    found = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    names = [f"{scheme}://{f.path}" for f in found
             if (fnmatch.fnmatch(f.base_name, pattern) if pattern else PurePosixPath(f.path).suffix in
                 TEXT_SUFFIXES | DATA_SUFFIXES)]
    if not names:
        raise FileNotFoundError(f"corpus path {uri!r} contains no text, jsonl or parquet files")
    return sorted(names)


def _sniff(path: Path) -> str | None:
    """Why a local file cannot be a document (empty, binary, unreadable), or None if it looks fine."""
    try:
        if path.stat().st_size == 0:
            return "empty"
        if path.suffix == ".parquet":
            return None
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        return "binary" if b"\x00" in head else None
    except OSError:
        return "unreadable"


def plan_corpus(data: DataConfig) -> CorpusPlan:
    """Resolve paths to files, drop the ones that cannot hold text, split train/validation by file."""
    local_specs = [p for p in data.paths if not _is_uri(p)]
    remote = [f for p in data.paths if _is_uri(p) for f in _remote_files(p)]
    local = corpus_files(local_specs, data.max_files) if local_specs or not remote else []
    skipped: dict[str, int] = {}
    kept: list[str] = []
    for f in local:
        reason = _sniff(f)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            log.debug("skipping %s corpus file %s", reason, f)
        else:
            kept.append(str(f.resolve()))
    files = sorted(kept + remote)[: data.max_files] if data.max_files else sorted(kept + remote)
    if skipped:
        log.warning("corpus: skipped %d of %d files (%s)", sum(skipped.values()), len(local),
                    ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    if len(files) < 2:
        raise ValueError(f"need at least two readable corpus files for a train/validation split, got {len(files)}")
    train, val = split_files(files, data.validation_fraction)
    log.info("corpus: %d train files, %d validation files", len(train), len(val))
    return CorpusPlan(train, val, skipped)


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
               seed: int | None = None, files_per_block: int = 16) -> ray.data.Dataset:
    """Packed rows {"input_ids": int32[seq_len]}.

    With a seed the files are read in a shuffled order (a global block shuffle would be an
    all-to-all stage that holds the whole corpus). Each read task takes a fixed group of
    `files_per_block` consecutive files and packs them in one call, so the rows depend only on the
    file order, never on how the streaming executor happens to batch blocks."""
    if seed is not None:
        files = sorted(files)
        random.Random(seed).shuffle(files)
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


def fit_tokenizer(plan: CorpusPlan, data: DataConfig, vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """Train the BPE tokenizer on (a sample of) the training documents, cached per file set."""
    cache = Path(cache_dir) / f"tokenizer-{plan.key}-{vocab_size}" / "tokenizer.json"
    if cache.exists():
        log.info("using cached tokenizer %s", cache)
        return Tokenizer.load(cache)
    budget = int(data.tokenizer_sample_mb * 2**20)

    def sample():
        used = 0
        for row in documents(plan.train_files, data.text_field).iter_rows():
            yield row["text"]
            used += len(row["text"])
            if used >= budget:
                return

    log.info("training a %d-token BPE tokenizer on up to %.0f MB of training documents", vocab_size,
             data.tokenizer_sample_mb)
    tokenizer = Tokenizer.train(sample(), vocab_size)
    tokenizer.save(cache)
    return tokenizer


# -- worker side ----------------------------------------------------------------------------------
class ShardBatches:
    """A worker's dataset shard as re-iterable epochs of {"input_ids": LongTensor (B, L)} batches.

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
            yield from np.array(batch["input_ids"], copy=True)  # own the rows held in the buffer

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
                yield {"input_ids": torch.from_numpy(np.stack(batch).astype(np.int64))}
                batch = []  # a last partial batch is dropped: every rank takes the same number of steps
