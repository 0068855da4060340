import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pllm.corpus_files import builtin_corpus_files, corpus_files, read_documents, split_files
from pllm.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def stdlib_tokenizer():
    files = builtin_corpus_files()[:60]
    return Tokenizer.train((d for f in files for d in read_documents(f)), vocab_size=512)


def test_builtin_corpus_is_the_standard_library():
    files = builtin_corpus_files()
    names = {f.name for f in files}
    assert {"os.py", "json/__init__.py".split("/")[-1], "collections/__init__.py".split("/")[-1]} <= names
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_split_is_deterministic_disjoint_and_near_the_fraction():
    files = builtin_corpus_files()
    train, val = split_files(files, 0.1)
    assert split_files(files, 0.1) == (train, val)
    assert not set(train) & set(val) and len(train) + len(val) == len(files)
    assert 0.05 < len(val) / len(files) < 0.15
    # adding files never moves an existing file to the other side
    train2, val2 = split_files(files[: len(files) // 2], 0.1)
    assert set(val2) <= set(val)


def test_special_tokens_and_round_trip(stdlib_tokenizer, tmp_path):
    tok = stdlib_tokenizer
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓\n"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == tok.encode(text) and again.vocab_size == 512
    ids = list(tok.iter_token_ids(["a = 1", "b = 2"]))
    assert [i[-1] for i in ids] == [2, 2]


def test_user_files_text_jsonl_parquet_and_skips(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2", ""]}), tmp_path / "c.parquet")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "empty.txt").write_text("")
    files = corpus_files([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "bad.txt", "c.parquet", "empty.txt"]
    with caplog.at_level(logging.WARNING):
        docs = [d for f in files for d in read_documents(f)]
    assert docs == ["plain text document", "first", "second", "p1", "p2"]
    assert "bad.txt" in caplog.text
    assert corpus_files([str(tmp_path / "*.jsonl")]) == [tmp_path / "b.jsonl"]


def test_a_path_that_matches_nothing_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        corpus_files([str(tmp_path / "nope" / "*.txt")])
