"""The Ray Data corpus pipeline on a real local Ray: skipping, packing, determinism, URIs, epochs."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pllm.config import DataConfig
from pllm.corpus_files import documents_until, plan_corpus
from pllm.pipelines.token_dataset import ShardBatches, documents, first_rows, round_documents, token_rows
from pllm.tokenizer import Tokenizer

DOCS = [f"def f{i}(x):\n    return x * {i}\n" * (i % 5 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(DOCS[:30]):
        (root / f"doc{i:02d}.py").write_text(doc)
    (root / "empty.txt").write_text("")
    (root / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 50)
    with open(root / "more.jsonl", "w") as f:
        for doc in DOCS[30:35]:
            f.write(json.dumps({"text": doc}) + "\n")
        f.write("{not json\n")  # a malformed line is dropped, the rest of the file kept
    pq.write_table(pa.table({"text": DOCS[35:]}), root / "rest.parquet")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(DOCS * 3, 300)


def test_a_path_matching_nothing_fails_before_ray_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        plan_corpus(DataConfig(paths=[str(tmp_path / "nope" / "*.txt")]))
    assert not ray.is_initialized()


def test_empty_and_binary_files_are_skipped_and_counted(corpus_dir, caplog):
    with caplog.at_level("WARNING"):
        plan = plan_corpus(DataConfig(paths=[str(corpus_dir)]))
    assert plan.skipped == {"binary": 1, "empty": 1}
    assert "skipped 2 of 34 files (1 binary, 1 empty)" in caplog.text
    assert len(plan.train_files) + len(plan.val_files) == 32


def test_text_jsonl_and_parquet_documents_are_read(local_ray, corpus_dir):
    plan = plan_corpus(DataConfig(paths=[str(corpus_dir)]))
    texts = [row["text"] for row in documents(plan.train_files + plan.val_files, "text").iter_rows()]
    assert sorted(texts) == sorted(DOCS)


def test_rows_are_full_length_eos_joined_documents(local_ray, tmp_path, tokenizer):
    files = []
    for i, doc in enumerate(DOCS[:12]):
        files.append(str(tmp_path / f"d{i:02d}.py"))
        (tmp_path / f"d{i:02d}.py").write_text(doc)
    rows = np.stack([r["input_ids"] for r in token_rows(files, tokenizer, 16, files_per_block=64).iter_rows()])
    stream = np.concatenate([tokenizer.encode(d) + [tokenizer.eos_token_id] for d in DOCS[:12]])
    n = len(stream) // 16
    assert rows.shape == (n, 16)  # no padding; only the last partial row is dropped
    assert np.array_equal(rows.ravel(), stream[: n * 16])


def test_order_is_deterministic_per_seed_and_uris_read_the_same(local_ray, corpus_dir, tokenizer):
    plan = plan_corpus(DataConfig(paths=[str(corpus_dir)]))
    files = plan.train_files

    def read(fs, seed):
        return [tuple(r["input_ids"]) for r in token_rows(fs, tokenizer, 16, seed=seed, files_per_block=4).iter_rows()]

    first, again, other = read(files, 0), read(files, 0), read(files, 1)
    assert first == again
    # Another seed reads the files in another order (rows are packed per batch of documents, so
    # they differ, not just their order).
    assert first != other and abs(len(first) - len(other)) <= len(first) // 10
    # URIs go through pyarrow filesystems (remote files are only checked when decoded).
    uri_plan = plan_corpus(DataConfig(paths=[corpus_dir.as_uri()]))
    listed = uri_plan.train_files + uri_plan.val_files
    assert len(listed) == 34 and all(f.startswith("file:///") for f in listed)
    assert read(["file://" + f for f in files], 0) == first


def test_epochs_reshuffle_locally_and_repeat_per_seed(local_ray, corpus_dir, tokenizer):
    plan = plan_corpus(DataConfig(paths=[str(corpus_dir)]))
    ds = token_rows(plan.train_files, tokenizer, 16, seed=0, files_per_block=4)
    batches = ShardBatches(ds.iterator(), batch_size=4, seed=0, shuffle_buffer_rows=64)

    def epoch(e):
        batches.set_epoch(e)
        return [tuple(row.tolist()) for b in batches for row in b["input_ids"]]

    e0, e1, e0_again = epoch(0), epoch(1), epoch(0)
    assert e0 == e0_again and e0 != e1
    # Same rows in another order, except the last partial batch, which is dropped (< batch_size rows).
    shared = sum((Counter(e0) & Counter(e1)).values())
    assert len(e0) == len(e1) and shared >= len(e0) - 4


def test_a_prefix_is_read_in_whole_rounds_and_equals_the_start_of_one_read(local_ray, tmp_path, tokenizer):
    """first_rows and round_documents read growing groups of files to their end (no `limit`, whose
    cancelled read tasks log errors) and give what the start of one read of all the files gives."""
    files = []
    for i in range(144):  # rounds of 64 and 80 files, whole blocks of 16 files as in one read of all 144
        files.append(str(tmp_path / f"f{i:03d}.py"))
        (tmp_path / f"f{i:03d}.py").write_text(DOCS[i % len(DOCS)])
    everything = np.stack([r["input_ids"] for r in token_rows(files, tokenizer, 16).iter_rows()])
    for n in (5, len(everything) - 3, len(everything) + 10):
        assert np.array_equal(first_rows(files, tokenizer, 16, "text", n), everything[:n])
    texts = [DOCS[i % len(DOCS)] for i in range(144)]
    budget = sum(len(t) for t in texts[:100])
    assert list(documents_until(round_documents(files, "text"), budget)) == texts[:100]
