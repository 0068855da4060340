"""pllm.sharded_load: each FSDP2 rank reads only its own rows of a checkpoint (ours, or a Hugging Face
one with q | k | v and gate | up read part by part), and the gathered model equals the one loaded whole."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from hf_fixtures import cases, reference_model, write_checkpoint
from pllm.checkpoint import load_config, load_model, save_pretrained
from pllm.config import LoraSettings, TrainingConfig
from pllm.hf import CheckpointError
from pllm.model import DiffusionTransformer
from pllm.sharded_load import load_local_shards

IDS = torch.arange(32).reshape(2, 16) * 3 % 90  # ids every vocabulary here holds


def _hf_case(name: str, **dims):
    """A fixture family with other dimensions (kv heads = 1: q | k | v splits inside q between 2 ranks)."""
    case = cases()[name]
    return dataclasses.replace(case, hf_config=case.hf_config | dims, published=case.published | dims)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    llama = _hf_case("llama", num_key_value_heads=1)  # tied embeddings, weights in bfloat16
    qwen2 = _hf_case("qwen2", num_key_value_heads=1)  # untied, q/k/v biases, float32
    out = {"llama": write_checkpoint(llama, reference_model(llama).to(torch.bfloat16), root / "llama", shards=2),
           "qwen2": write_checkpoint(qwen2, reference_model(qwen2), root / "qwen2", shards=2)}
    # Ours: vocab 97 gives uneven shards (49 | 48 rows) of the embedding and the head.
    for name, overrides in {"ours_tied": dict(tie_word_embeddings=True, num_key_value_heads=1),
                            "ours_untied": dict(attention_bias=True, intermediate_size=40)}.items():
        torch.manual_seed(1)
        model = DiffusionTransformer(tiny_config(vocab_size=97, **overrides))
        with torch.no_grad():  # norm scales other than 1, so a misplaced one shows
            for n, p in model.named_parameters():
                if n.endswith("norm.weight") or n.endswith("bias"):
                    p.uniform_(0.5, 1.5)
        out[name] = save_pretrained(model, root / name)
    return out


def _total_bytes(folder: Path) -> int:
    return sum(t.numel() * t.element_size() for f in folder.glob("*.safetensors") for t in load_file(f).values())


def _meta_model(folder: str | Path, lora: bool) -> DiffusionTransformer:
    with torch.device("meta"):
        model = DiffusionTransformer(load_config(folder))
    if lora:
        from pllm.lora import apply_lora

        apply_lora(model, LoraSettings(rank=2))
    return model


def _worker(rank: int, port: int, runs: list[tuple[str, str, bool]], out: str) -> None:
    import torch.distributed as dist

    from pllm.strategies.fsdp import apply_fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for key, folder, lora in runs:
            model = _meta_model(folder, lora)
            apply_fsdp(model, TrainingConfig(), torch.device("cpu"))
            model.to_empty(device="cpu")
            model.set_rotary_buffers("cpu")
            result = load_local_shards(model, folder)
            full = {n: p.full_tensor().contiguous() for n, p in model.named_parameters()}
            if not lora:  # FSDP's own all-gather in forward sees the loaded shards too
                with torch.no_grad():
                    full["__logits__"] = model.eval()(IDS)
            results = [None, None]
            dist.all_gather_object(results, dataclasses.asdict(result))
            if rank == 0:
                save_file(full, f"{out}/{key}.safetensors")
                tied = model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
                Path(f"{out}/{key}.json").write_text(json.dumps({"ranks": results, "tied": tied}))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called ...")


RUNS = [("llama", "llama", False), ("qwen2", "qwen2", False), ("ours_tied", "ours_tied", False),
        ("ours_untied", "ours_untied", False), ("qwen2_lora", "qwen2", True), ("ours_tied_lora", "ours_tied", True)]


@pytest.fixture(scope="module")
def sharded(folders, tmp_path_factory) -> Path:
    """Every run above on 2 gloo ranks (one spawn for all): the gathered tensors and each rank's report."""
    out = tmp_path_factory.mktemp("gathered")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = [(key, str(folders[folder]), lora) for key, folder, lora in RUNS]
    mp.spawn(_worker, args=(port, runs, str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("key", ["llama", "qwen2", "ours_tied", "ours_untied"])
def test_two_ranks_read_half_each_and_gather_the_model(folders, sharded, key):
    reference = load_model(folders[key])
    expected = dict(reference.named_parameters())
    got = load_file(sharded / f"{key}.safetensors")
    logits = got.pop("__logits__")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got), [n for n in got if not torch.equal(got[n], expected[n])]
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(IDS))
    info = json.loads((sharded / f"{key}.json").read_text())
    assert info["tied"] == reference.config.tie_word_embeddings
    total = _total_bytes(folders[key])
    for rank in info["ranks"]:
        assert rank["loaded"] == list(expected) and rank["missing"] == []
        assert 0.4 * total < rank["bytes_read"] < 0.6 * total
    assert sum(r["bytes_read"] for r in info["ranks"]) == total  # every row read once, by one rank


@pytest.mark.parametrize("key, folder", [("qwen2_lora", "qwen2"), ("ours_tied_lora", "ours_tied")])
def test_lora_adapters_are_missing_and_the_base_weights_load(folders, sharded, key, folder):
    expected = dict(load_model(folders[folder]).named_parameters())
    got = load_file(sharded / f"{key}.safetensors")
    lora = sorted(n for n in got if "lora_" in n)
    base = {n: n.replace("base_layer.", "") for n in got if "lora_" not in n}
    assert lora and any("base_layer" in n for n in base)
    assert sorted(base.values()) == sorted(expected)
    assert all(torch.equal(got[n], expected[ours]) for n, ours in base.items())
    for rank in json.loads((sharded / f"{key}.json").read_text())["ranks"]:
        assert sorted(rank["missing"]) == lora and sorted(rank["loaded"]) == sorted(base)


@pytest.mark.parametrize("key", ["llama", "qwen2", "ours_tied", "ours_untied"])
def test_one_process_reads_the_whole_model(folders, key):
    torch.manual_seed(2)
    model = DiffusionTransformer(load_config(folders[key]))  # plain tensors, randomly initialised
    result = load_local_shards(model, folders[key])
    expected = dict(load_model(folders[key]).named_parameters())
    got = dict(model.named_parameters())
    assert result.loaded == list(expected) and result.missing == []
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert result.bytes_read == _total_bytes(folders[key])
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_a_shape_that_differs_names_the_file_and_tensor(folders):
    hf = DiffusionTransformer(load_config(folders["qwen2"]).replace(intermediate_size=80))
    with pytest.raises(CheckpointError) as err:
        load_local_shards(hf, folders["qwen2"])
    message = str(err.value)
    assert "'model.layers.0.mlp.gate_proj.weight'" in message and "model-000" in message
    assert "[96, 64]" in message and "[80, 64]" in message and "layers.0.mlp.gate_up_proj.weight" in message

    ours = DiffusionTransformer(load_config(folders["ours_untied"]).replace(vocab_size=98))
    with pytest.raises(CheckpointError) as err:
        load_local_shards(ours, folders["ours_untied"])
    message = str(err.value)
    assert "model.safetensors" in message and "'embed_tokens.weight'" in message
    assert "[97, 32]" in message and "[98, 32]" in message


def test_a_checkpoint_tensor_with_no_place_in_the_model_fails(folders):
    model = DiffusionTransformer(load_config(folders["ours_untied"]).replace(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\..*has no place in the model"):
        load_local_shards(model, folders["ours_untied"])
