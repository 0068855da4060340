"""`serve run serve_config.yaml`, the way the README starts the endpoint from a config file."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from serve_fixtures import MODEL_NAME, free_port, make_model_dir, register_model

REPO = Path(__file__).resolve().parents[1]


def test_serve_run_with_the_repo_config(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry_uri = register_model(make_model_dir(tmp_path / "model"), tracking_uri)
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    config["applications"][0]["args"].update(model=registry_uri, max_replicas=1)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}  # the config leaves mlflow_uri to the environment
    env.pop("RAY_ADDRESS", None)
    serve_cli = str(Path(sys.executable).parent / "serve")  # the environment's `serve` script
    proc = subprocess.Popen([serve_cli, "run", str(tmp_path / "serve.yaml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(1)
        r = requests.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "import re\n", "max_tokens": 8,
                                                         "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run shuts the app and its local Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_flags_set_the_engines_kv_cache_pool():
    from pllm.cli import build_parser, serve_args
    from pllm.config import EngineConfig

    args = build_parser().parse_args(["serve", "--model", "m", "--kv-cache-pages", "512", "--no-prefix-caching"])
    engine = EngineConfig.from_dict(serve_args(args).engine)
    assert (engine.kv_cache_pages, engine.prefix_caching, engine.max_num_seqs) == (512, False, 32)
    default = EngineConfig.from_dict(serve_args(build_parser().parse_args(["serve", "--model", "m"])).engine)
    assert default.kv_cache_pages is None and default.prefix_caching
