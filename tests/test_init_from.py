"""model.init_from: a job starts from an imported Hugging Face checkpoint (or a saved / registered
model) with its config and tokenizer; model fields given beside it override the checkpoint's, shape
changes fail before Ray starts; FSDP2 ranks read their own rows of it (with LoRA: adapters only in
checkpoints, the base read again on resume); the in-process job trains from it. The Ray job from a
checkpoint (FSDP2 on 2 gloo workers, registering a model that keeps its ids) is in
tests/test_adapt.py and tests/test_sft_ray.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from hf_fixtures import cases, reference_model, write_checkpoint
from pllm.config import JobConfig, TrainingConfig
from pllm.hf import CheckpointError, import_checkpoint
from pllm.pipelines.job_stages import initial_model, resolve_init

SDAR = cases()["sdar"]
# The tiny jobs' settings (tests/test_train_job.py), with a model section of init_from and overrides only.
TRAINING = dict(batch_size=4, seq_len=64, learning_rate=1e-3, warmup_steps=2, num_train_steps=4, eval_interval=2,
                eval_batches=2, log_interval=2, use_torch_compile=False, use_cuda_graphs=False,
                gradient_checkpointing=False, mixed_precision="no", weight_decay=0.01)
GENERATION = dict(max_new_tokens=8, num_refinement_steps=8, block_size=4, temperature=0.0)


@pytest.fixture(scope="module")
def sdar(tmp_path_factory) -> Path:
    return write_checkpoint(SDAR, reference_model(SDAR), tmp_path_factory.mktemp("hf") / "sdar")


@pytest.fixture
def restore_mlflow_uri():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which later tests' subprocesses would inherit."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)


def job_dict(folder: Path, out: Path, **model) -> dict:
    return {"model": {"init_from": str(folder), **model}, "training": {**TRAINING, "output_dir": str(out)},
            "data": {"max_files": 40}, "generation": GENERATION, "prompt": "w1 w2 w3"}


def test_the_checkpoint_config_with_the_given_fields_over_it(sdar, tmp_path):
    job = JobConfig.from_dict(job_dict(sdar, tmp_path, block_size=8, noise_schedule="linear"))
    init, resolved = resolve_init(job)
    imported, tokenizer = import_checkpoint(sdar)
    expected = imported.config.replace(block_size=8, noise_schedule="linear", init_from=str(sdar))
    assert resolved.model == expected and resolved.model.attention_mode == "block_causal"
    assert init.folder == sdar and init.tokenizer.to_json() == tokenizer.to_json()
    assert init.tokenizer.special_token_ids == tokenizer.special_token_ids != {
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "mask_token_id": 3}
    # The job's other sections are untouched; a given field equal to the checkpoint's is allowed.
    assert resolved.training == job.training
    same = JobConfig.from_dict(job_dict(sdar, tmp_path, hidden_size=64, vocab_size=256))
    assert resolve_init(same)[1].model.hidden_size == 64


def test_the_starting_model_has_the_checkpoint_weights_under_the_job_config(sdar, tmp_path):
    _, job = resolve_init(JobConfig.from_dict(job_dict(sdar, tmp_path, block_size=8)))
    imported, _ = import_checkpoint(sdar)
    model = initial_model(job.model, sdar, seed=0)
    assert model.config.block_size == 8 and model.rope_cos.device.type == "cpu"
    assert model.lm_head.weight.dtype == torch.float32
    ours, theirs = model.state_dict(), imported.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # block size 8 changes the block-causal mask: the same weights, other logits than block size 4
    ids = torch.randint(0, 240, (2, 16))
    assert not torch.allclose(model.eval()(ids), imported(ids))
    fresh = initial_model(job.model, None, seed=0)
    assert not torch.equal(fresh.embed_tokens.weight, model.embed_tokens.weight)


def _fsdp_worker(rank: int, port: int, folder: str, config: dict, out: str, lora: bool) -> None:
    import torch.distributed as dist

    from pllm.config import LoraSettings, ModelConfig
    from pllm.strategies import strategy_class
    from pllm.trainer import DistributedTrainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = TrainingConfig(**TRAINING | dict(num_train_steps=2, output_dir=str(Path(out).parent)),
                             lora=LoraSettings(rank=2, target_modules=("qkv_proj", "down_proj")) if lora else None)
        model_cfg = ModelConfig.from_dict(config)
        assert strategy_class(cfg).loads_shards
        batches = [torch.randint(0, 240, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]

        def trainer_from_checkpoint() -> DistributedTrainer:
            model = initial_model(model_cfg, folder, seed=0, on_meta=True)
            assert model.embed_tokens.weight.is_meta
            trainer = DistributedTrainer(model, cfg, model_cfg, batches, device="cpu", show_progress=False)
            trainer.strategy.load_shards(folder)  # each rank reads its own rows of the files
            return trainer

        trainer = trainer_from_checkpoint()
        info = {"local": sum(p.to_local().numel() for p in trainer.strategy.module.parameters()),
                "rope_ok": bool(torch.isfinite(trainer.strategy.module.rope_cos).all())}
        if lora:
            trainer.train()
            saved = trainer.save_checkpoint(Path(out).parent / "ckpt")
            from torch.distributed.checkpoint import FileSystemReader

            keys = FileSystemReader(str(saved / "dcp")).read_metadata().state_dict_metadata
            info["checkpoint_model_keys"] = sorted(k for k in keys if k.startswith("model."))
            trained = trainer.consolidated_model(merge_lora=False)
            resumed = trainer_from_checkpoint()  # the base from the files again, the adapters from the checkpoint
            resumed.load_checkpoint(saved)
            again = resumed.consolidated_model(merge_lora=False)
            if rank == 0:
                info["resumed_equal"] = all(torch.equal(a, b) for a, b in
                                            zip(trained.state_dict().values(), again.state_dict().values()))
                info["resumed_step"] = resumed.step
                full = {k.replace("base_layer.", ""): v for k, v in trained.state_dict().items() if "lora_" not in k}
        else:
            full = trainer.strategy.consolidated_state_dict()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight" or
                       not model_cfg.tie_word_embeddings}, out)
            Path(out + ".json").write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it ("terminate called ...")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp2_ranks_read_their_shards_of_the_checkpoint(sdar, tmp_path, lora):
    """Every rank reads its own rows; with LoRA the base stays bit-identical through training, the
    checkpoint holds the adapters only, and a resume reads the base from the files again."""
    _, job = resolve_init(JobConfig.from_dict(job_dict(sdar, tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "full.safetensors")
    mp.spawn(_fsdp_worker, args=(port, str(sdar), job.model.to_dict(), out, lora), nprocs=2, join=True)
    imported, _ = import_checkpoint(sdar)
    expected, got = imported.state_dict(), load_file(out)
    assert got.keys() == {k for k in expected if k != "lm_head.weight" or not imported.config.tie_word_embeddings}
    assert all(torch.equal(got[k], expected[k]) for k in got)
    info = json.loads(Path(out + ".json").read_text())
    assert info["rope_ok"] and info["local"] < imported.num_parameters()  # rank 0 holds a shard, not the model
    if lora:
        keys = info["checkpoint_model_keys"]
        assert keys and all("lora_" in k for k in keys), keys[:4]
        assert len(keys) == 2 * 2 * imported.config.num_hidden_layers  # A and B of 2 projections a layer
        assert info["resumed_equal"] and info["resumed_step"] == 2


def _fails_before_ray(job: JobConfig, *message: str) -> None:
    import ray

    from pllm.pipelines.train_job import run_training_job

    with pytest.raises(CheckpointError) as err:
        run_training_job(job)
    assert all(m in str(err.value) for m in message), str(err.value)
    assert not ray.is_initialized()


def test_bad_init_from_fails_naming_it_before_ray_starts(sdar, tmp_path):
    missing = tmp_path / "no-such-model"
    _fails_before_ray(JobConfig.from_dict(job_dict(missing, tmp_path)), "model.init_from", str(missing),
                      "no such file")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_text((sdar / name).read_text())
    _fails_before_ray(JobConfig.from_dict(job_dict(no_weights, tmp_path)), "model.init_from", str(no_weights),
                      "no weights")
    _fails_before_ray(JobConfig.from_dict(job_dict(sdar, tmp_path, hidden_size=128)), "model.hidden_size=128",
                      "model.init_from", "hidden_size=64")


def test_a_shape_override_on_the_command_line_fails_fast(sdar, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_dict(sdar, tmp_path / "run")))
    proc = subprocess.run([sys.executable, "-m", "pllm.pipelines.train_job", "--config", str(config),
                           "--set", "model.num_hidden_layers=4"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "model.num_hidden_layers=4 cannot be set with model.init_from=" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_in_process_job_trains_from_the_checkpoint_with_its_tokenizer(sdar, tmp_path):
    from pllm.checkpoint import load_config, load_tokenizer
    from pllm.pipelines.in_process_job import run_in_process_job

    result = run_in_process_job(JobConfig.from_dict(job_dict(sdar, tmp_path / "run", noise_schedule="linear")),
                                show_progress=False)
    m = result.metrics
    assert (m["step"], m["world_size"]) == (4, 1) and m["val_elbo_nats"] > 0
    _, tokenizer = import_checkpoint(sdar)
    saved = load_tokenizer(result.model_dir)
    assert saved.to_json() == tokenizer.to_json() and saved.special_token_ids == tokenizer.special_token_ids
    assert (result.model_dir / "tokenizer_config.json").is_file()
    cfg = load_config(result.model_dir)
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.noise_schedule) == (256, tokenizer.mask_token_id, "linear")
    logged = json.loads((tmp_path / "run" / "job_config.json").read_text())["model"]
    assert logged["init_from"] == str(sdar) and logged["hidden_size"] == 64
