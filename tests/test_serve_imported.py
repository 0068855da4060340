"""An imported Hugging Face checkpoint end to end: `pllm import` registers a tiny LLaDA in a real MLflow
store, Ray Serve serves `models:/NAME@ALIAS` over HTTP with the checkpoint's own chat template
(quantized at load to int8, as `pllm serve --quantize int8` does), the engine stops on its
end-of-turn id, and `pllm generate --chat` renders the template."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import ray
import requests
import torch
from mlflow.tracking import MlflowClient
from ray import serve
from safetensors.torch import load_file, save_file

import hf_fixtures
from pllm import GenerationConfig, ParallelGenerator
from pllm.actors.openai_protocol import ChatMessage, chat_prompt
from pllm.checkpoint import load_model, load_tokenizer
from pllm.cli import main
from pllm.engine import Engine
from pllm.hf import import_checkpoint, plan_import
from serve_fixtures import free_port

CASE = hf_fixtures.cases()["llada"]
EOT, EOS = CASE.special_id("<|eot_id|>"), CASE.special_id("<|endoftext|>")
WORDS = {f"w{i}" for i in range(hf_fixtures.REGULAR)}
HEAD = "model.transformer.ff_out.weight"  # LLaDA's LM head
MESSAGES = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return hf_fixtures.write_checkpoint(CASE, hf_fixtures.reference_model(CASE), tmp_path_factory.mktemp("hf") / "llada")


@pytest.fixture(scope="module")
def imported(folder, tmp_path_factory) -> dict:
    """`pllm import` in-process (a module fixture: the server below needs the registered version)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["import", str(folder), "--register", "llada-tiny", "--alias", "champion", "--mlflow-uri", uri])
    return {"rc": rc, "stdout": out.getvalue(), "uri": uri}


def words(text: str) -> list[str]:
    pieces = text.split()
    assert all(p in WORDS for p in pieces), text
    return pieces


# -- import and registry -------------------------------------------------------------------------
def test_import_logs_and_registers_with_the_alias(folder, imported):
    assert imported["rc"] == 0
    out = imported["stdout"]
    assert "llada" in out and f"stops [{EOT}]" in out and "chat template yes" in out, out
    assert "registered as models:/llada-tiny@champion" in out, out
    client = MlflowClient(imported["uri"])
    version = client.get_model_version_by_alias("llada-tiny", "champion")
    assert str(version.version) == "1"
    assert client.get_run(version.run_id).data.tags["pllm.family"] == "llada"


# -- stopping on the end-of-turn id (the engine, no Serve) ---------------------------------------
def head_favouring(folder: Path, target: Path, token: int) -> Path:
    """A copy of the checkpoint whose LM head row for `token` is 1.5 x the row of the token the original
    greedy answer ends with: `token` then outranks it wherever it led, so the answer turns into
    `token` part of the way through."""
    shutil.copytree(folder, target)
    base, tok = import_checkpoint(folder)
    last = run(base, tok, stop=False)[0][-1]
    index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    shard = target / index[HEAD]
    tensors = load_file(str(shard))
    tensors[HEAD][token] = 1.5 * tensors[HEAD][last]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return target


def run(model, tok, stop: bool, n: int = 16) -> tuple[list[int], str]:
    engine = Engine(model)
    engine.add_request(tok.apply_chat_template(MESSAGES, tokenize=True),
                       GenerationConfig(max_new_tokens=n, num_refinement_steps=n, block_size=8, temperature=0.0,
                                        use_adaptive_steps=stop))
    tokens, reason = [], None
    while engine.has_work():
        for out in engine.step():
            tokens += out.new_token_ids
            reason = out.finish_reason or reason
    return tokens, reason


def test_answer_ends_before_the_first_end_of_turn_token(folder, tmp_path):
    copy = head_favouring(folder, tmp_path / "eot", EOT)
    model, tok = import_checkpoint(copy)
    assert model.config.stop_token_ids == (EOT,) and model.config.eos_token_id == EOS
    full, reason = run(model, tok, stop=False)
    assert reason == "length" and len(full) == 16
    first = full.index(EOT)  # the copy really ranks <|eot_id|> first part of the way through
    assert 0 < first < 16 and EOT not in full[:first]
    answer, reason = run(model, tok, stop=True)
    # Tokens before the first final stop id are final when it is found: the answer is that prefix.
    assert answer == full[:first] and reason == "stop"


def test_answer_ends_before_the_first_eos_as_before_end_of_turn(folder, tmp_path):
    eot_model, tok = import_checkpoint(head_favouring(folder, tmp_path / "eot", EOT))
    eos_model, _ = import_checkpoint(head_favouring(folder, tmp_path / "eos", EOS))
    assert eos_model.config.pad_token_id == EOS
    # The same logits with the favoured row on another id: the same answer, stopped the same way.
    assert run(eos_model, tok, stop=True) == run(eot_model, tok, stop=True)


# -- pllm generate on the imported folder --------------------------------------------------------
GEN = ["--max-new-tokens", "8", "--steps", "8", "--block-size", "8"]


def test_generate_chat_renders_the_checkpoint_template(folder, capsys):
    assert main(["generate", "--model", str(folder), "--prompt", "w3 w4 w5", "--chat", *GEN]) == 0
    chat_out = capsys.readouterr().out
    assert main(["generate", "--model", str(folder), "--prompt", "w3 w4 w5", *GEN]) == 0
    plain_out = capsys.readouterr().out
    assert plain_out.startswith("w3 w4 w5")
    model, tok = load_model(folder), load_tokenizer(folder)
    gen = ParallelGenerator(model, GenerationConfig(max_new_tokens=8, num_refinement_steps=8, block_size=8,
                                                    temperature=0.0), tokenizer=tok)
    expected = gen.generate_text(tok.apply_chat_template([{"role": "user", "content": "w3 w4 w5"}]))
    assert chat_out == expected + "\n" and words(expected)
    assert gen.generate_text("w3 w4 w5") != expected, "the template changes the answer, so the check above tells"


def test_generate_chat_without_a_template_is_an_error(tmp_path, capsys):
    case = hf_fixtures.cases()["qwen2"]  # a base model: no chat template
    plain = hf_fixtures.write_checkpoint(case, hf_fixtures.reference_model(case), tmp_path / "qwen2")
    assert main(["generate", "--model", str(plain), "--prompt", "w1", "--chat", *GEN]) == 2
    captured = capsys.readouterr()
    assert "no chat template" in captured.err and captured.out == ""


# -- serving models:/llada-tiny@champion over HTTP ------------------------------------------------
@pytest.fixture(scope="module")
def server(imported):
    assert imported["rc"] == 0
    http_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False)
    from pllm.actors.serve_app import ServeArgs, build_app

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        args = ServeArgs(model="models:/llada-tiny@champion", mlflow_uri=imported["uri"], min_replicas=1, max_replicas=1,
                         quantize="int8")
        serve.run(build_app(args), name="imported", route_prefix="/")
        yield f"http://127.0.0.1:{http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120)


def chat_ok(url: str, messages: list[dict], max_tokens: int = 8) -> dict:
    r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_completion_renders_the_checkpoint_template(server, folder):
    assert requests.get(server + "/v1/models", timeout=30).json()["data"][0]["id"] == "llada-tiny"
    info = serve.get_deployment_handle("Generator", app_name="imported").info.remote().result()
    assert info["quantization"]["precision"] == "int8"  # the replica serves the projections quantized
    result = chat_ok(server, MESSAGES)
    message, usage = result["choices"][0]["message"], result["usage"]
    assert message["role"] == "assistant" and result["choices"][0]["finish_reason"] in ("stop", "length")
    tok = load_tokenizer(folder)
    templated = len(tok.apply_chat_template(MESSAGES, tokenize=True))
    assert templated != len(tok.encode(chat_prompt([ChatMessage(**m) for m in MESSAGES]))), \
        "the plain fallback prompt has another length, so prompt_tokens tells which one was rendered"
    assert usage["prompt_tokens"] == templated
    assert 0 < len(words(message["content"])) <= usage["completion_tokens"] <= 8


@pytest.mark.parametrize("body, code", [
    ({"messages": "w1 w2"}, "invalid_value"),  # not a list
    ({"messages": [{"role": "user"}]}, "invalid_value"),  # no content
    ({"messages": [{"role": "user", "content": "w1 " * 200}], "max_tokens": 8}, "context_length_exceeded"),
])
def test_malformed_chat_gets_a_4xx_and_the_server_keeps_serving(server, body, code):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["param"].startswith("messages")
    assert words(chat_ok(server, MESSAGES)["choices"][0]["message"]["content"])


def test_completion_on_the_imported_model(server):
    r = post(server, "/v1/completions", {"prompt": "w7 w8 w9", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["object"] == "text_completion" and result["usage"]["prompt_tokens"] == 3
    assert len(words(result["choices"][0]["text"])) <= result["usage"]["completion_tokens"] <= 8
