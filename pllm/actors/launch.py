"""Start the Serve application from Python or the `pllm serve` command, and send a completion."""

from __future__ import annotations

import json
import os
import time
import urllib.request

from pllm.config import local_ray_cpus
from pllm.registry import resolve_tracking_uri

APP_NAME = "pllm"


def start_server(args, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app (on RAY_ADDRESS's cluster, the Ray already running here, or a new local Ray)
    and return its base URL once every replica is up."""
    import ray
    from ray import serve

    from .serve_app import build_app

    if not ray.is_initialized():
        ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else local_ray_cpus())
    if args.mlflow_uri is None and args.model.startswith(("models:/", "runs:/")):
        # This shell's tracking URI, else the cluster's (`pllm cluster start` sets one for its Ray processes),
        # else the embedded store, its path pinned now because replicas run in other folders.
        uri = os.environ.get("MLFLOW_TRACKING_URI") or cluster_tracking_uri()
        args = args.model_copy(update={"mlflow_uri": resolve_tracking_uri(uri)})
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def cluster_tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI as the connected Ray cluster's processes see it."""
    import ray

    @ray.remote(num_cpus=0)
    def tracking_env() -> str | None:
        return os.environ.get("MLFLOW_TRACKING_URI")

    return ray.get(tracking_env.remote())


def complete(base_url: str, prompt: str, max_tokens: int = 32, timeout: float = 120, **fields) -> dict:
    """POST /v1/completions with the standard library (no client package needed)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, **fields}).encode()
    request = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM (as `timeout` or a container stop sends), then delete the app."""
    import signal

    from ray import serve

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
