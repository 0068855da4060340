"""Corpus files: the built-in corpus (the running interpreter's standard library sources) and user
files (text, jsonl with a text field, parquet with a text column), with a deterministic split by file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath
from typing import TypeVar

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".c", ".h", ".json", ".toml", ".yaml", ".yml"}
DATA_SUFFIXES = {".jsonl", ".parquet"}
F = TypeVar("F", str, Path)  # a local path or a URI string
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def builtin_corpus_files() -> list[Path]:
    """All `.py` files of the running interpreter's standard library (third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    return files


def resolve_files(paths: list[str]) -> list[Path]:
    """Expand files, folders (recursively) and globs into a sorted list of corpus files."""
    files: set[Path] = set()
    for spec in paths:
        matches = [Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True)]
        if not matches:
            raise FileNotFoundError(f"corpus path {spec!r} matches no file or folder")
        for match in matches:
            if match.is_dir():
                for dirpath, dirnames, filenames in os.walk(match):
                    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
                    for name in filenames:
                        p = Path(dirpath) / name
                        if p.suffix in TEXT_SUFFIXES | DATA_SUFFIXES:
                            files.add(p)
            else:
                files.add(match)
    if not files:
        raise FileNotFoundError(f"corpus paths {paths} contain no text, jsonl or parquet files")
    return sorted(files)


def corpus_files(paths: list[str] | None = None, max_files: int | None = None) -> list[Path]:
    files = resolve_files(paths) if paths else builtin_corpus_files()
    return files[:max_files] if max_files else files


def is_validation_file(path: str | PurePath, validation_fraction: float) -> bool:
    """Deterministic split by file: a hash of the file's name (not its location) picks the side,
    so the split is the same on every machine and does not change as files are added. Paths and
    URIs (s3://bucket/a/b.txt) hash the same way: by their last three parts."""
    key = "/".join(PurePosixPath(str(path)).parts[-3:]).encode()
    bucket = int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2**64
    return bucket < validation_fraction


def split_files(files: list[F], validation_fraction: float) -> tuple[list[F], list[F]]:
    train = [f for f in files if not is_validation_file(f, validation_fraction)]
    val = [f for f in files if is_validation_file(f, validation_fraction)]
    if not train or not val:
        # Too few files for a hash split: hold out the last file(s) instead.
        n_val = max(1, round(len(files) * validation_fraction)) if len(files) > 1 else 0
        if n_val == 0:
            raise ValueError("need at least two corpus files for a train/validation split")
        train, val = files[:-n_val], files[-n_val:]
    return train, val


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file; unreadable or binary files yield nothing (logged)."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        text = json.loads(line).get(text_field)
                        if isinstance(text, str) and text:
                            yield text
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for text in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist():
                if isinstance(text, str) and text:
                    yield text
        else:
            text = path.read_text(encoding="utf-8")
            if "\x00" in text:
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "contains NUL bytes (binary file)")
            if text.strip():
                yield text
    except (ValueError, OSError, AttributeError) as e:  # decode, JSON and Arrow errors are ValueErrors
        log.warning("skipping unreadable corpus file %s: %s", path, e)
