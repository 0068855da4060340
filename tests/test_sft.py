"""Instruction fine-tuning: rows, the loss's masking and value, the built-in instruction set."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from pllm import DiffusionTransformer, Tokenizer
from pllm.diffusion import get_schedule
from pllm.instructions import arithmetic_examples, function_return_examples, is_held_out, write_jsonl
from pllm.sft import encode_example, encode_examples, pack_examples, sft_loss


def word_tokenizer(template: str | None = None) -> Tokenizer:
    from hf_fixtures import tiny_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    ids = {"pad_token_id": 240, "bos_token_id": 240, "eos_token_id": 240, "mask_token_id": 243}
    return Tokenizer(tiny_tokenizer(specials), special_token_ids=ids, chat_template=template)


TEMPLATE = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + ' ' + m.content + '<|im_end|>' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{%- endif %}")


def test_rows_are_prompt_response_and_eos_padding():
    tok = word_tokenizer(TEMPLATE)
    row = encode_example(tok, {"messages": [{"role": "user", "content": "w5 w6"},
                                            {"role": "assistant", "content": "w7 w8 w9"}]}, seq_len=16)
    prompt = tok.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=True)
    assert row.input_ids[:row.prompt_length] == prompt
    assert row.input_ids[row.prompt_length:] == [7, 8, 9] + [240] * (16 - row.prompt_length - 3)
    cut = encode_example(tok, {"prompt": "w1", "response": " ".join(f"w{i}" for i in range(50))}, seq_len=16)
    assert len(cut.input_ids) == 16 and cut.input_ids[-1] == 240  # cut, still ending on eos
    rows, skipped = encode_examples(tok, [{"prompt": "w1", "response": ""}, {"prompt": "w1 " * 40, "response": "w2"},
                                          {"prompt": "w1", "response": "w2"}], seq_len=16)
    assert len(rows) == 1 and skipped == {"empty response": 1, "prompt too long": 1}


def test_a_masked_position_never_falls_inside_a_prompt():
    model = DiffusionTransformer(tiny_config(vocab_size=256, pad_token_id=240, bos_token_id=240, eos_token_id=240,
                                             mask_token_id=243)).eval()
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(32, dtype=torch.bool)
    captured = {}
    model.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))  # the noisy rows
    for _ in range(200):
        ids = torch.randint(0, 240, (4, 32), generator=g)
        prompts = torch.randint(1, 31, (4,), generator=g)
        with torch.no_grad():
            sft_loss(model, ids, torch.arange(32)[None] >= prompts[:, None], get_schedule("linear"), 243, generator=g)
        masked = captured["x"] == 243
        for b in range(4):
            assert not masked[b, :prompts[b]].any()
            seen |= masked[b]
    assert seen[1:].all()  # every response position gets masked sometimes


def test_the_loss_equals_a_hand_computed_value():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(vocab_size=256, pad_token_id=240, bos_token_id=240, eos_token_id=240,
                                             mask_token_id=243)).eval()
    ids = torch.randint(0, 240, (2, 10))
    prompts = torch.tensor([3, 6])
    t = torch.tensor([0.5, 0.25])
    draw = torch.rand(2, 10, generator=torch.Generator().manual_seed(1))
    out = sft_loss(model, ids, torch.arange(10)[None] >= prompts[:, None], get_schedule("linear"), 243, t=t,
                   mask_draw=draw)
    expected = 0.0
    for b in range(2):
        masked = [i for i in range(prompts[b], 10) if draw[b, i] < t[b]]
        x_t = ids[b].clone()
        x_t[masked] = 243
        logits = model(x_t[None])[0]
        ce = sum(F.cross_entropy(logits[i], ids[b, i], reduction="sum") for i in masked)
        expected += ce / t[b] / (10 - prompts[b])  # linear schedule: weight 1 / t; per response length
    expected /= 2
    assert out.num_masked > 0
    assert torch.allclose(out.loss, torch.as_tensor(expected), rtol=1e-5)


def test_the_instruction_set_is_made_here_and_split_by_question(tmp_path):
    import json
    import sysconfig
    from pathlib import Path

    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py"))
    returns = function_return_examples(files)
    assert returns and all(e.response.startswith(f"`") and " returns `" in e.response for e in returns)
    assert any("json.decoder" in e.prompt or "json.encoder" in e.prompt for e in returns)
    sums = arithmetic_examples(200, seed=3)
    for e in sums:
        a, op, b = e.prompt.removeprefix("What is ").removesuffix("?").split(" ")
        assert int(e.response) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    assert arithmetic_examples(200, seed=3) == sums
    held = [e for e in sums if is_held_out(e, 0.2)]
    assert 0 < len(held) < len(sums)
    path = write_jsonl(sums[:3], tmp_path / "sft.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["messages"][1] == {"role": "assistant", "content": sums[0].response}


@pytest.mark.parametrize("features", [dict(), dict(attention_mode="block_causal", block_size=4, logits_shift=True)],
                         ids=["bidirectional", "block-causal-shifted"])
def test_packed_examples_never_attend_across_their_boundary(features):
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(**features)).eval()
    a, b = torch.randint(4, 90, (1, 7)), torch.randint(4, 90, (1, 9))
    segments = torch.tensor([[0] * 7 + [1] * 9])
    packed = model(torch.cat([a, b], 1), segment_ids=segments)
    other = model(torch.cat([a, torch.randint(4, 90, (1, 9))], 1), segment_ids=segments)
    assert torch.allclose(packed[:, :7], other[:, :7], atol=1e-5)  # a's logits ignore what b is
    assert not torch.allclose(packed[:, 7:], other[:, 7:])
    # each example's logits are those of the example alone
    assert torch.allclose(packed[:, :7], model(a), atol=1e-5)
    assert torch.allclose(packed[:, 7:], model(b), atol=1e-5)


def test_packed_sft_rows_keep_each_example_apart_in_the_loss():
    """Two examples packed in one row give the loss of the two as rows of their own."""
    tok = word_tokenizer(TEMPLATE)
    examples = [{"prompt": "w3 w4", "response": "w5 w6 w7"}, {"prompt": "w8", "response": "w9 w10"}]
    rows = [encode_example(tok, e, 24, pad=False) for e in examples]
    packed = pack_examples(rows, 24, pad_token_id=240)
    assert len(packed) == 1 and packed[0].segment_ids[-1] == 2  # the tail is a segment of its own
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(vocab_size=256, pad_token_id=240, bos_token_id=240, eos_token_id=240,
                                             mask_token_id=243)).eval()
    row = packed[0]
    t = torch.tensor([[0.6, 0.3, 0.9]])
    draw = torch.rand(1, 24, generator=torch.Generator().manual_seed(2))
    out = sft_loss(model, torch.tensor([row.input_ids]), torch.tensor([row.response_mask]), get_schedule("linear"),
                   243, segment_ids=torch.tensor([row.segment_ids]), t=t, mask_draw=draw)
    alone = []
    start = 0
    for k, r in enumerate(rows):
        n = len(r.input_ids)
        ids = torch.tensor([r.input_ids])
        alone.append(sft_loss(model, ids, torch.arange(n)[None] >= r.prompt_length, get_schedule("linear"), 243,
                              t=t[:, k], mask_draw=draw[:, start:start + n]).loss)
        start += n
    assert torch.allclose(out.loss, torch.stack(alone).mean(), rtol=1e-5)
    assert out.num_tokens == sum(len(r.input_ids) - r.prompt_length for r in rows)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_trainer_fine_tunes_on_sft_batches(packed, tmp_path):
    """SFT batches (a response_mask) train with the SFT loss; held-out examples' loss falls; the
    prompt tokens are never what the loss predicts."""
    from pllm import DistributedTrainer, TrainingConfig
    from pllm.sft import evaluate_sft, sft_dataloader

    tok = word_tokenizer(TEMPLATE)
    g = torch.Generator().manual_seed(0)

    def example():  # the response repeats the prompt's words in reverse: learnable
        words = [f"w{int(i)}" for i in torch.randint(4, 60, (4,), generator=g)]
        return {"prompt": " ".join(words), "response": " ".join(reversed(words))}

    rows = [encode_example(tok, example(), 24, pad=not packed) for _ in range(160)]
    rows = pack_examples(rows, 24, pad_token_id=240) if packed else rows
    train, val = rows[:-16], rows[-16:]
    cfg = tiny_config(vocab_size=256, pad_token_id=240, bos_token_id=240, eos_token_id=240, mask_token_id=243,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg)
    training = TrainingConfig(batch_size=8, seq_len=24, learning_rate=3e-3, num_train_steps=60, warmup_steps=5,
                              eval_interval=60, eval_batches=2, log_interval=20, use_fsdp=False,
                              use_torch_compile=False, gradient_checkpointing=False, output_dir=str(tmp_path))
    val_loader = sft_dataloader(val, 8, shuffle=False)
    before = evaluate_sft(model, val_loader, get_schedule(cfg.noise_schedule), 243)["val_sft_loss"]
    trainer = DistributedTrainer(model, training, cfg, sft_dataloader(train, 8, shuffle=True), val_loader)
    metrics = trainer.train()
    assert metrics["val_sft_loss"] < 0.8 * before


def test_an_in_process_sft_job_fine_tunes_an_imported_checkpoint(tmp_path, caplog):
    import json
    import logging

    from hf_fixtures import cases, reference_model, write_checkpoint
    from pllm.checkpoint import load_tokenizer
    from pllm.config import JobConfig
    from pllm.pipelines.in_process_job import run_in_process_job

    case = cases()["sdar"]
    folder = write_checkpoint(case, reference_model(case), tmp_path / "sdar")
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(240):
        words = [f"w{int(i)}" for i in torch.randint(4, 60, (3,), generator=g)]
        rows.append({"messages": [{"role": "user", "content": " ".join(words)},
                                  {"role": "assistant", "content": " ".join(reversed(words))}]})
    rows += [{"prompt": "w1", "response": ""}, {"prompt": "w1 " * 80, "response": "w2"}]  # skipped, counted
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    job = JobConfig.from_dict({
        "task": "sft", "model": {"init_from": str(folder)}, "data": {"paths": [str(data)], "validation_fraction": 0.1},
        "training": dict(batch_size=8, seq_len=32, learning_rate=2e-3, warmup_steps=2, num_train_steps=30,
                         eval_interval=10, eval_batches=2, log_interval=10, use_torch_compile=False,
                         gradient_checkpointing=False, mixed_precision="no", output_dir=str(tmp_path / "run")),
        "generation": dict(max_new_tokens=8, num_refinement_steps=8, block_size=4, temperature=0.0),
        "prompt": "w1 w2"})
    with caplog.at_level(logging.INFO, logger="pllm.pipelines.in_process_job"):
        result = run_in_process_job(job, show_progress=False)
    assert result.metrics["step"] == 30 and result.metrics["val_sft_loss"] > 0
    assert "skipped" in caplog.text and "empty response" in caplog.text and "prompt too long" in caplog.text
    assert load_tokenizer(result.model_dir).special_token_ids["mask_token_id"] == case.special_id("<|MASK|>")
    # the held-out examples' loss, before (the imported checkpoint) and after fine-tuning
    from pllm import load_model
    from pllm.hf import import_checkpoint
    from pllm.pipelines.in_process_job import build_sft_loaders
    from pllm.pipelines.job_stages import resolve_init
    from pllm.sft import evaluate_sft

    init, resolved = resolve_init(job)
    held_out = build_sft_loaders(resolved, init.tokenizer).val
    schedule, mask = get_schedule(resolved.model.noise_schedule), resolved.model.mask_token_id
    before = evaluate_sft(import_checkpoint(folder)[0], held_out, schedule, mask)["val_sft_loss"]
    after = evaluate_sft(load_model(result.model_dir), held_out, schedule, mask)["val_sft_loss"]
    assert after < 0.9 * before


def test_sft_needs_a_checkpoint():
    from pydantic import ValidationError

    from pllm.config import JobConfig

    with pytest.raises(ValidationError, match="task 'sft' starts from a checkpoint: set model.init_from"):
        JobConfig.from_dict({"task": "sft"})


def test_lora_sft_saves_a_merged_model_and_an_adapter_on_its_base(tmp_path):
    import json

    from hf_fixtures import cases, reference_model, write_checkpoint
    from pllm import load_model
    from pllm.config import JobConfig
    from pllm.hf import import_checkpoint
    from pllm.pipelines.in_process_job import run_in_process_job

    case = cases()["qwen3"]
    folder = write_checkpoint(case, reference_model(case), tmp_path / "qwen3")
    rows = [{"prompt": f"w{i} w{i + 1}", "response": f"w{i + 2}"} for i in range(4, 200)]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    job = JobConfig.from_dict({
        "task": "sft", "model": {"init_from": str(folder)}, "data": {"paths": [str(data)], "sft_packing": True},
        "training": dict(batch_size=4, seq_len=32, learning_rate=5e-3, warmup_steps=1, num_train_steps=6,
                         eval_interval=6, eval_batches=1, log_interval=3, use_torch_compile=False,
                         gradient_checkpointing=False, mixed_precision="no", output_dir=str(tmp_path / "run"),
                         lora={"rank": 4, "target_modules": ["qkv_proj", "o_proj"]}),
        "generation": dict(max_new_tokens=4, num_refinement_steps=4, block_size=1, temperature=0.0),
        "prompt": "w1 w2"})
    result = run_in_process_job(job, show_progress=False)
    base = import_checkpoint(folder)[0].state_dict()
    merged = load_model(result.model_dir).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("qkv_proj" in k or "o_proj" in k for k in changed)  # only the adapted projections
    from_adapter = load_model(tmp_path / "run" / "adapter").state_dict()  # base + adapter, merged on load
    assert all(torch.allclose(from_adapter[k], merged[k], atol=1e-6) for k in merged)


def test_answer_accuracy_scores_exact_answers_and_their_form():
    """A model that has learnt the held-out answers scores 1; one that has not scores below, per kind."""
    from pllm.instructions import Example, _has_form, answer_accuracy

    returns = Example("In the Python module `m`, what does the function `f` return?", "`f` returns `x`.", "returns")
    assert _has_form(returns, "`f` returns `y + 1`.") and not _has_form(returns, "f returns y")
    assert _has_form(Example("What is 1 + 2?", "3", "arithmetic"), "12") and not _has_form(
        Example("What is 1 + 2?", "3", "arithmetic"), "3.")
    tok = word_tokenizer(TEMPLATE)
    examples = [Example("w5 w6", "w7", "arithmetic"), Example("w8 w9", "w10 w11", "arithmetic")]
    model = memorizing_model(tok, examples)
    scores = answer_accuracy(model, tok, examples)
    assert scores["examples"] == 2 and scores["exact_match"] == 1.0 and scores["arithmetic_exact_match"] == 1.0
    wrong = answer_accuracy(model, tok, [Example("w5 w6", "w11", "arithmetic")])
    assert wrong["exact_match"] == 0.0


def memorizing_model(tok: Tokenizer, examples) -> DiffusionTransformer:
    """A tiny model fine-tuned on these examples until it knows them."""
    from pllm import DistributedTrainer, TrainingConfig
    from pllm.sft import sft_dataloader

    rows = [encode_example(tok, {"prompt": e.prompt, "response": e.response}, 16) for e in examples] * 8
    cfg = tiny_config(vocab_size=256, pad_token_id=240, bos_token_id=240, eos_token_id=240, mask_token_id=243,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg)
    training = TrainingConfig(batch_size=8, seq_len=16, learning_rate=5e-3, num_train_steps=150, warmup_steps=5,
                              log_interval=60, use_fsdp=False, use_torch_compile=False, gradient_checkpointing=False,
                              weight_decay=0.0)
    DistributedTrainer(model, training, cfg, sft_dataloader(rows, 8, shuffle=True), show_progress=False).train()
    return model.eval()
