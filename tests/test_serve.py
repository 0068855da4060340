"""The Ray Serve application for real: a local Ray cluster, the model loaded from a real MLflow registry,
HTTP requests through the official `openai` client and raw HTTP."""

import concurrent.futures as cf
import json
import os
import signal
import threading
import time

import openai
import pytest
import ray
import requests
from ray import serve

from serve_fixtures import MODEL_NAME, free_port, make_model_dir, register_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    registry_uri = register_model(make_model_dir(root / "model"), tracking_uri)
    draft_dir = make_model_dir(root / "draft", seed=1)  # the same tokenizer, other weights
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=8, include_dashboard=False, _metrics_export_port=metrics_port)
    from pllm.actors.serve_app import ServeArgs, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    args = ServeArgs(model=registry_uri, draft_model=str(draft_dir), mlflow_uri=tracking_uri, min_replicas=1, max_replicas=1,
                     engine={"max_num_seqs": 32, "max_batched_tokens": 8192})
    serve.run(build_app(args), name="pllm", route_prefix="/")
    url = f"http://127.0.0.1:{http_port}"
    yield {"url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
           "generator": serve.get_deployment_handle("Generator", app_name="pllm")}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def stats(server) -> dict:
    return server["generator"].stats.remote().result()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert requests.get(server["url"] + "/health").json() == {"status": "ok", "model": MODEL_NAME}


def test_openai_client_completions_streaming_and_chat(client):
    kw = dict(model=MODEL_NAME, max_tokens=24, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt="def parse(value):\n", **kw)
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens > 0 and full.choices[0].text
    chunks = list(client.completions.create(prompt="def parse(value):\n", stream=True, **kw))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == full.choices[0].text, "the stream carries exactly the same answer"
    assert sum(1 for t in texts if t) >= 2, "text arrives in several pieces as blocks become final"
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
    chat = client.chat.completions.create(messages=messages, **kw)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 24
    stream = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == 24


def test_raw_http_sse_format(server):
    body = {"prompt": "import json\n", "max_tokens": 16, "temperature": 0, "stream": True, "block_size": 4,
            "ignore_eos": True}
    with requests.post(server["url"] + "/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert [p["choices"][0]["finish_reason"] for p in payloads][-1] == "length"


def _request(url: str, body: dict) -> dict:
    r = requests.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("strategy", ["draft_verify", "speculative"])
def test_lossless_strategy_over_http_equals_static(server, strategy):
    """draft_verify drafts from the model itself; speculative from the draft model the server loaded."""
    for temperature, seed in ((0.0, None), (0.9, 5)):
        body = {"prompt": "def f(x):\n", "max_tokens": 24, "temperature": temperature, "seed": seed, "block_size": 8,
                "steps": 24, "ignore_eos": True}
        static = _request(server["url"], {**body, "strategy": "static"})
        lossless = _request(server["url"], {**body, "strategy": strategy, "draft_length": 4})
        assert lossless["choices"][0]["text"] == static["choices"][0]["text"]


def test_32_concurrent_mixed_requests_equal_their_single_request_results(server):
    bodies = []
    for i in range(32):
        bodies.append({
            "prompt": ["def f(x):\n", "import os\n", "class A:\n    def __init__(self):\n", "# a comment\n"][i % 4] * (1 + i % 3),
            "max_tokens": [4, 9, 16, 23, 32, 40][i % 6], "temperature": [0.0, 0.7][i % 2], "seed": 100 + i,
            "top_p": [1.0, 0.9][(i // 2) % 2], "top_k": [0, 40][(i // 4) % 2], "strategy": ["static", "threshold", "factor", "credit", "draft_verify", "speculative"][(i // 3) % 6],
            "kv_cache": ["none", "prefix", "dual"][(i // 2) % 3],
            "block_size": [4, 8, None][i % 3], "steps": [None, 8][(i // 5) % 2], "ignore_eos": i % 8 != 0})
    before = stats(server)["peak_batch_size"]
    with cf.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: _request(server["url"], b), bodies))
    assert stats(server)["peak_batch_size"] >= max(before, 8), "requests shared forward passes"
    for body, result in zip(bodies, together):
        choice = result["choices"][0]
        if body["ignore_eos"]:
            assert result["usage"]["completion_tokens"] == body["max_tokens"] and choice["finish_reason"] == "length"
        else:
            assert result["usage"]["completion_tokens"] <= body["max_tokens"]
        alone = _request(server["url"], body)  # one at a time: nothing else in the batch
        assert alone["choices"][0]["text"] == choice["text"] and alone["usage"] == result["usage"]


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 4', 400, "invalid_json"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "invalid_encoding"),
    ("/v1/completions", b'["prompt"]', 400, "invalid_json"),
    ("/v1/completions", b'{"max_tokens": 4}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": ""}', 400, "invalid_value"),
    ("/v1/completions", json.dumps({"prompt": "word " * 400}).encode(), 400, "context_length_exceeded"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -3}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -0.5}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model_not_found"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "strategy": "beam"}', 400, "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "kv_cache": "block"}', 400, "invalid_value"),  # bidirectional model
    ("/v1/completions", b'{"prompt": "x", "draft_length": 0}', 400, "invalid_value"),
    ("/v1/no-such-route", b'{}', 404, "not_found"),
]


@pytest.mark.parametrize("path, body, status, code", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, path, body, status, code):
    r = requests.post(server["url"] + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    ok = _request(server["url"], {"prompt": "x = 1\n", "max_tokens": 4, "ignore_eos": True})
    assert ok["usage"]["completion_tokens"] == 4


def test_openai_client_raises_the_status_error(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=4)


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = stats(server)
    body = {"prompt": "def long():\n", "max_tokens": 200, "steps": 200, "block_size": 4, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with requests.post(server["url"] + "/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line)
        assert json.loads(first[len("data: "):])["choices"][0]["text"] is not None
    # the connection is closed after the first chunk
    deadline = time.time() + 30
    while time.time() < deadline:
        now = stats(server)
        if now["aborted"] > before["aborted"] and now["running"] == 0 and now["open_streams"] == 0:
            break
        time.sleep(0.2)
    assert now["aborted"] == before["aborted"] + 1 and now["running"] == 0, now
    assert now["generated_tokens"] - before["generated_tokens"] < 200, "it stopped before finishing"


def test_serve_and_engine_metrics_reach_prometheus(server):
    _request(server["url"], {"prompt": "x", "max_tokens": 4})
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = requests.get(server["metrics"], timeout=10).text
        if "pllm_generated_tokens" in text and "serve_num_http_requests" in text:
            break
        time.sleep(2)
    for name in ("pllm_requests", "pllm_generated_tokens", "pllm_request_latency_s", "pllm_batch_size",
                 "pllm_tokens_per_second", "serve_num_http_requests"):
        assert name in text, f"{name} missing from the Prometheus endpoint"


def test_killed_idle_replica_is_replaced(server):
    old_pid = stats(server)["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline, last = time.time() + 120, None
    while time.time() < deadline:
        try:
            r = requests.post(server["url"] + "/v1/completions", timeout=30,
                              json={"prompt": "x = 2\n", "max_tokens": 6, "ignore_eos": True})
            if r.status_code == 200:
                break
            last = r.text
        except requests.RequestException as exc:
            last = exc
        time.sleep(1)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, last
    assert stats(server)["pid"] != old_pid


def test_stop_string_ends_the_answer_and_frees_the_slot(server):
    base = {"prompt": "def g():\n", "max_tokens": 48, "temperature": 1.0, "seed": 7, "ignore_eos": True,
            "block_size": 4}
    full = _request(server["url"], base)["choices"][0]["text"]
    # a 3-character stop string whose first occurrence is early in the answer
    k = next(k for k in range(3, len(full) - 3) if full.find(full[k:k + 3]) == k)
    stop = full[k:k + 3]
    before = stats(server)["aborted"]
    result = _request(server["url"], {**base, "stop": [stop]})
    assert result["choices"][0]["text"] == full[: full.index(stop)]
    assert result["choices"][0]["finish_reason"] == "stop"
    deadline = time.time() + 20
    while stats(server)["aborted"] == before and time.time() < deadline:
        time.sleep(0.2)
    assert stats(server)["aborted"] == before + 1, "the rest of the answer was not generated"


def test_generator_replicas_autoscale_up_under_load_and_back_down(server, tmp_path):
    from pllm.actors.serve_app import ServeArgs, build_app

    model_dir = make_model_dir(tmp_path / "model")
    args = ServeArgs(model=str(model_dir), model_name="autoscaled", min_replicas=1, max_replicas=2,
                     target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=2, num_cpus_per_replica=0.5)
    serve.run(build_app(args), name="autoscale", route_prefix="/autoscale")
    url = server["url"] + "/autoscale"

    def replicas() -> int:
        status = serve.status().applications["autoscale"].deployments["Generator"]
        return status.replica_states.get("RUNNING", 0)

    body = {"prompt": "def slow():\n", "max_tokens": 200, "steps": 200, "ignore_eos": True, "temperature": 0}
    stop = threading.Event()

    def keep_busy() -> int:  # one client sending requests back to back until told to stop
        done = 0
        while not stop.is_set():
            assert _request(url, body)["usage"]["completion_tokens"] == 200
            done += 1
        return done

    try:
        assert replicas() == 1
        # This app has no draft model: a speculative request is refused, and the app keeps serving.
        r = requests.post(url + "/v1/completions", json={"prompt": "x", "strategy": "speculative"}, timeout=30)
        assert r.status_code == 400 and "draft model" in r.json()["error"]["message"]
        with cf.ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(keep_busy) for _ in range(8)]
            deadline, peak = time.time() + 120, 1
            while time.time() < deadline and peak < 2:
                peak = max(peak, replicas())
                time.sleep(0.5)
            stop.set()
            assert sum(c.result() for c in clients) > 0
        assert peak == 2, "sustained load above target_ongoing_requests added a replica"
        deadline = time.time() + 90
        while time.time() < deadline and replicas() > 1:
            time.sleep(1)
        assert replicas() == 1, "idle: back to min_replicas"
    finally:
        serve.delete("autoscale")


def test_a_draft_model_with_another_tokenizer_fails_before_deploying(tmp_path):
    from conftest import tiny_config
    from pllm import DiffusionTransformer, save_pretrained
    from pllm.actors.serve_app import ServeArgs, build_app

    other = save_pretrained(DiffusionTransformer(tiny_config()), tmp_path / "other")  # vocabulary of 96, not 512
    with pytest.raises(ValueError, match="vocab_size"):
        build_app(ServeArgs(model=str(make_model_dir(tmp_path / "model")), draft_model=str(other)))


# -- an endpoint that can face the network: API keys, limits, a bounded queue, a deadline ---------
KEYS = ("sk-first-key", "sk-second-key")


@pytest.fixture(scope="module")
def guarded(server, tmp_path_factory):
    """Two more apps on the same Serve instance: one with API keys (a key file of two), request limits
    and a replica taking one request with one queued; one whose deadline every request overruns."""
    from pllm.actors.serve_app import ServeArgs, build_app

    root = tmp_path_factory.mktemp("guarded")
    key_file = root / "keys.txt"
    key_file.write_text(f"# accepted keys\n{KEYS[0]}\n{KEYS[1]}\n")
    model = str(make_model_dir(root / "model"))
    args = ServeArgs(model=model, model_name=MODEL_NAME, min_replicas=1, max_replicas=1, api_key_file=str(key_file),
                     max_ongoing_requests=1, max_queued_requests=1,
                     limits={"max_request_bytes": 4096, "max_prompt_tokens": 64, "max_tokens": 32, "retry_after_s": 2})
    serve.run(build_app(args), name="guarded", route_prefix="/guarded")
    late = ServeArgs(model=model, model_name=MODEL_NAME, min_replicas=1, max_replicas=1,
                     limits={"request_timeout_s": 0.05})
    serve.run(build_app(late), name="late", route_prefix="/late")
    return {"url": server["url"] + "/guarded", "late": server["url"] + "/late",
            "late_generator": serve.get_deployment_handle("Generator", app_name="late")}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


COMPLETION = {"prompt": "def f(x):\n", "max_tokens": 8, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "def f(x):"}], "max_tokens": 8, "temperature": 0}


@pytest.mark.parametrize("method, path, body", [("get", "/v1/models", None), ("post", "/v1/completions", COMPLETION),
                                                ("post", "/v1/chat/completions", CHAT)])
def test_every_route_but_health_needs_a_valid_api_key(guarded, method, path, body):
    url = guarded["url"] + path
    for headers in ({}, auth("sk-wrong"), {"Authorization": KEYS[0]}):  # none, a wrong key, no Bearer scheme
        r = requests.request(method, url, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"] == "Bearer"
    for key in KEYS:  # either key of the file
        assert requests.request(method, url, json=body, headers=auth(key), timeout=60).status_code == 200
    assert requests.get(guarded["url"] + "/health", timeout=30).status_code == 200  # probes need no key


def test_the_openai_client_authenticates_with_its_api_key(guarded):
    good = openai.OpenAI(base_url=guarded["url"] + "/v1", api_key=KEYS[1], max_retries=0, timeout=60)
    assert good.completions.create(model=MODEL_NAME, prompt="def f(x):\n", max_tokens=4).usage.completion_tokens > 0
    bad = openai.OpenAI(base_url=guarded["url"] + "/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("body, status, code, names", [
    ({**COMPLETION, "prompt": "x " * 3000}, 413, "request_too_large", "4096"),
    ({**COMPLETION, "prompt": "def f(x):\n" * 40}, 400, "prompt_too_long", "max_prompt_tokens"),
    ({**COMPLETION, "max_tokens": 33}, 400, "invalid_value", "max_tokens"),
])
def test_requests_over_a_limit_get_a_4xx_naming_it(guarded, body, status, code, names):
    r = requests.post(guarded["url"] + "/v1/completions", json=body, headers=auth(KEYS[0]), timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and names in r.json()["error"]["message"]
    assert requests.post(guarded["url"] + "/v1/completions", json=COMPLETION, headers=auth(KEYS[0]),
                         timeout=60).status_code == 200


def test_a_full_queue_answers_429_with_retry_after_then_recovers(guarded):
    # One request runs on the replica, at most one waits for it; of six sent at once the rest get 429.
    body = {**COMPLETION, "max_tokens": 32, "ignore_eos": True, "steps": 32}
    with cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: requests.post(guarded["url"] + "/v1/completions", json=body,
                                                           headers=auth(KEYS[0]), timeout=120), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 1 <= codes.count(200) <= 2 and codes.count(429) >= 4 and set(codes) <= {200, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "2" and refused.json()["error"]["code"] == "server_overloaded"
    assert requests.post(guarded["url"] + "/v1/completions", json=COMPLETION, headers=auth(KEYS[0]),
                         timeout=60).status_code == 200  # the load fell: served again


def test_a_request_past_its_deadline_is_stopped_and_its_slot_freed(guarded):
    # 200 denoising steps cannot finish within the 'late' app's 50 ms.
    body = {**COMPLETION, "max_tokens": 200, "ignore_eos": True, "steps": 200}
    r = requests.post(guarded["late"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert "request_timeout_s" in r.json()["error"]["message"]
    streamed = requests.post(guarded["late"] + "/v1/completions", json={**body, "stream": True}, timeout=60)
    # Out of time before its first chunk: a 504 status; after it: the stream ends with the timeout error.
    assert streamed.status_code == 504 or (streamed.status_code == 200 and '"code": "timeout"' in streamed.text
                                           and streamed.text.rstrip().endswith("data: [DONE]")), streamed.text[-500:]
    for _ in range(100):  # the replica aborts the requests: nothing left running or waiting
        s = guarded["late_generator"].stats.remote().result()
        if s["running"] == 0 and s["waiting"] == 0 and s["open_streams"] == 0:
            break
        time.sleep(0.1)
    assert s["running"] == 0 and s["waiting"] == 0 and s["open_streams"] == 0, s
