"""Corpus files: the built-in corpus (the running interpreter's standard library sources) and user
files (text, jsonl with a text field, parquet with a text column; local paths, folders, globs or
remote URIs such as s3://... through pyarrow filesystems), the files that cannot hold text dropped,
and a deterministic train/validation split by file. Nothing here reads documents in bulk: that is
`pllm.data` (in one process) or `pllm.pipelines.token_dataset` (Ray Data).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TypeVar

from .config import DataConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".c", ".h", ".json", ".toml", ".yaml", ".yml"}
DATA_SUFFIXES = {".jsonl", ".parquet"}
F = TypeVar("F", str, Path)  # a local path or a URI string
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
SNIFF_BYTES = 4096


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


# -- the corpus plan: which files train, which validate ---------------------------------------------------------------
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


def iter_documents(files: list[str] | list[Path], text_field: str = "text") -> Iterator[str]:
    """The documents of local `files`, in order, read lazily."""
    for f in files:
        yield from read_documents(Path(f), text_field)


def documents_until(docs: Iterable[str], budget_chars: int) -> Iterator[str]:
    """`docs` in order, up to and including the one that reaches `budget_chars` characters; stops
    consuming `docs` there, so a lazy reader reads no further."""
    used = 0
    for text in docs:
        yield text
        used += len(text)
        if used >= budget_chars:
            return


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
