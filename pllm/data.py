"""In-process data path: tokenize corpus files once (cached), pack fixed-length rows with EOS
separators, and serve them through a DataLoader. (`pllm.pipelines.token_dataset` streams the same
rows across a Ray cluster.)"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .config import DataConfig
from .corpus_files import corpus_files, iter_documents, split_files
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where tokenizers and tokenized corpora are cached (PLLM_CACHE_DIR, default ~/.cache/pllm)."""
    return Path(os.environ.get("PLLM_CACHE_DIR", Path.home() / ".cache" / "pllm"))


@dataclass
class CorpusData:
    tokenizer: Tokenizer
    train_tokens: np.ndarray  # 1-D, documents joined with EOS
    val_tokens: np.ndarray
    num_train_files: int
    num_val_files: int


def _documents(files: list[Path], text_field: str) -> list[str]:
    return list(iter_documents(files, text_field))


def _tokenize(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    pieces = [np.asarray(ids, dtype=dtype) for ids in tokenizer.iter_token_ids(docs)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def tokenize_files(files: list[str], tokenizer: Tokenizer, text_field: str, cache_dir: str | Path) -> np.ndarray:
    """The documents of local `files` as one EOS-joined token stream, cached under cache_dir keyed by
    the files (names and sizes), the text field and the tokenizer."""
    paths = [Path(f) for f in files]
    key_src = json.dumps([[str(f), f.stat().st_size] for f in paths] + [text_field, tokenizer.to_json()])
    cache = Path(cache_dir) / f"tokens-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}.npy"
    if cache.exists():
        log.info("using cached tokens %s", cache)
        return np.load(cache)
    tokens = _tokenize(tokenizer, _documents(paths, text_field))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, tokens)
    return tokens


def prepare_corpus(data: DataConfig, vocab_size: int, cache_dir: str | Path) -> CorpusData:
    """Split the corpus by file, train a BPE tokenizer on the training side, tokenize both sides.
    Results are cached under cache_dir, keyed by the file list, sizes and vocabulary size."""
    files = corpus_files(data.paths, data.max_files)
    train_files, val_files = split_files(files, data.validation_fraction)
    key_src = json.dumps([[str(f), f.stat().st_size] for f in files] + [vocab_size, data.text_field])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"corpus-{key}"
    if (cache / "val.npy").exists():
        log.info("using cached tokenized corpus %s", cache)
        tokenizer = Tokenizer.load(cache)
        train, val = np.load(cache / "train.npy"), np.load(cache / "val.npy")
    else:
        log.info("training a %d-token BPE tokenizer on %d files", vocab_size, len(train_files))
        train_docs = _documents(train_files, data.text_field)
        tokenizer = Tokenizer.train(train_docs, vocab_size)
        train = _tokenize(tokenizer, train_docs)
        val = _tokenize(tokenizer, _documents(val_files, data.text_field))
        cache.mkdir(parents=True, exist_ok=True)
        tokenizer.save(cache)
        np.save(cache / "train.npy", train)
        np.save(cache / "val.npy", val)
    log.info("corpus: %d train files (%d tokens), %d validation files (%d tokens)",
             len(train_files), train.size, len(val_files), val.size)
    return CorpusData(tokenizer, train, val, len(train_files), len(val_files))


class PackedDataset(Dataset):
    """Non-overlapping rows of seq_len tokens cut from the EOS-joined token stream (no padding)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if tokens.size < seq_len:
            raise ValueError(f"corpus has {tokens.size} tokens, fewer than one row of seq_len={seq_len}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return self.tokens.size // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.tokens[i * self.seq_len : (i + 1) * self.seq_len]
        return torch.from_numpy(row.astype(np.int64))


def make_dataloader(
    tokens: np.ndarray, seq_len: int, batch_size: int, shuffle: bool, seed: int = 0, max_rows: int | None = None
) -> DataLoader:
    """Shuffled batches for training; for evaluation (shuffle=False), `max_rows` evenly spaced rows,
    so a short validation pass still covers every part of the validation files."""
    dataset: Dataset = PackedDataset(tokens, seq_len)
    if max_rows is not None and max_rows < len(dataset):
        dataset = Subset(dataset, np.linspace(0, len(dataset) - 1, max_rows).round().astype(int).tolist())
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=generator)


def unigram_entropy(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training set's unigram
    distribution (add-one smoothed): what a model that ignores context achieves."""
    counts = np.bincount(train_tokens.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    val_counts = np.bincount(val_tokens.astype(np.int64), minlength=vocab_size)
    return float(-(val_counts * log_p).sum() / max(val_counts.sum(), 1))


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)
