"""The whole local flow on real processes: `pllm cluster start`, one training job through `pllm cluster
submit` and one through the plain `ray job submit ... -- python -m pllm.pipelines.train_job`, both tracked
and registered on the cluster's MLflow server; `serve run serve_config.yaml` answers from the registered
model; `pllm cluster stop` leaves nothing running."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from pllm.cluster.jobs import job_logs, wait_for_job
from pllm.cluster.processes import port_in_use
from pllm.cluster.state import load_state
from serve_fixtures import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Free ports (the kernel's ephemeral range, above Ray's worker ports 10002-19999), not the defaults others use.
def distinct_free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


RAY_PORT, DASHBOARD_PORT, MLFLOW_PORT, SERVE_PORT = distinct_free_ports(4)
QUICK = ["data.max_files=80", "training.num_train_steps=24", "training.warmup_steps=4", "training.eval_interval=24",
         "training.eval_batches=2", "training.log_interval=4", "training.save_interval=24", "training.use_fsdp=false",
         "cluster.num_workers=1", "generation.max_new_tokens=16", "generation.num_refinement_steps=16"]


def pllm_cluster(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pllm.cli", "cluster", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def readme_line(prefix: str) -> list[str]:
    """The README's command line that starts with `prefix`, as a user would type it."""
    lines = [line.split("#")[0].strip() for line in (REPO / "README.md").read_text().splitlines()]
    found = [line for line in lines if line.startswith(prefix)]
    assert found, f"README.md shows no `{prefix} ...` line"
    return shlex.split(found[0])


def sets(output_dir: Path) -> list[str]:
    return [a for o in [*QUICK, f"training.output_dir={output_dir}"] for a in ("--set", o)]


def our_processes(*markers: str) -> list[psutil.Process]:
    """Processes whose command line names one of our folders (Ray's session folder, the cluster folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(m in cmdline for m in markers):
            found.append(proc)
    return found


@pytest.fixture
def cluster(tmp_path):
    cluster_dir = tmp_path / "cluster"
    ray_tmp = Path(tempfile.mkdtemp(prefix="pllm-ray-"))  # short: Ray's socket paths live under it
    yield cluster_dir, ray_tmp
    pllm_cluster("stop", "--dir", str(cluster_dir), timeout=120)  # also when the test failed half-way
    for proc in our_processes(str(ray_tmp), str(cluster_dir)):
        try:
            proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


def post_completion(prompt: str, timeout: float) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0.0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{SERVE_PORT}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve_until_answered(cmd: list[str], env: dict, log_file: Path, deadline_s: float = 420) -> dict:
    """Run a serving command, wait until the app answers one completion, then Ctrl-C it."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            assert proc.poll() is None, f"{cmd[:2]} exited: {log_file.read_text()[-4000:]}"
            try:
                return post_completion("def read_file(path):\n", timeout=60)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                assert time.monotonic() < deadline, f"no answer ({exc}): {log_file.read_text()[-4000:]}"
                time.sleep(2)
    finally:
        proc.send_signal(signal.SIGINT)  # both delete the app on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_jobs_and_serve_share_the_clusters_tracking_server(cluster, tmp_path):
    cluster_dir, ray_tmp = cluster
    started = pllm_cluster("start", "--dir", str(cluster_dir), "--num-cpus", "6", "--ray-port", str(RAY_PORT),
                           "--dashboard-port", str(DASHBOARD_PORT), "--mlflow-port", str(MLFLOW_PORT),
                           "--ray-temp-dir", str(ray_tmp))
    assert started.returncode == 0, started.stdout + started.stderr
    state = load_state(cluster_dir)
    tracking_uri = f"http://127.0.0.1:{MLFLOW_PORT}"
    assert state.tracking_uri == tracking_uri and tracking_uri in started.stdout
    assert f"http://127.0.0.1:{DASHBOARD_PORT}" in started.stdout and "pllm cluster submit" in started.stdout
    again = pllm_cluster("start", "--dir", str(cluster_dir))
    assert again.returncode == 1 and "already running" in again.stderr

    submitted = pllm_cluster("submit", "--dir", str(cluster_dir), "--config", "pllm/configs/tiny.yaml",
                             *sets(tmp_path / "runs" / "submit"))
    assert submitted.returncode == 0, submitted.stdout[-5000:] + submitted.stderr[-3000:]
    assert "SUCCEEDED" in submitted.stdout and f"at {tracking_uri}" in submitted.stdout

    # Any entrypoint: it runs with the cluster's tracking server and this environment's python.
    probe = pllm_cluster("submit", "--dir", str(cluster_dir), "--", "python", "-c",
                         "import os, sys; print('probe', os.environ['MLFLOW_TRACKING_URI'], sys.executable)")
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    assert f"probe {tracking_uri} {BIN / 'python'}" in probe.stdout

    # The plain Ray line, as a user types it after `source .venv/bin/activate` and `export RAY_AUTH_MODE=token`.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": state.dashboard_url}
    env.pop("MLFLOW_TRACKING_URI", None)  # the job must get the tracking server from the cluster, not from here
    plain = subprocess.run([*readme_line("ray job submit"), *sets(tmp_path / "runs" / "plain")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    submitted_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", plain.stdout)
    assert submitted_id, plain.stdout[-3000:] + plain.stderr[-3000:]
    # Judged by the job, not by `ray job submit`'s exit code: its log stream can drop on a busy machine.
    status = wait_for_job(state, submitted_id.group(1))
    logs = job_logs(state, submitted_id.group(1))
    assert status == "SUCCEEDED", logs[-5000:]
    # ... and its runs went to the cluster's server, not to a sqlite file in Ray's temporary copy of `.`
    assert f"at {tracking_uri}" in logs, "the plain job did not log to the cluster's tracking server: " + \
        next((line for line in logs.splitlines() if "MLflow run" in line), logs[-3000:])
    assert not list(ray_tmp.rglob("mlflow.db"))

    status = pllm_cluster("status", "--dir", str(cluster_dir))
    assert status.returncode == 0 and "Ray:    up" in status.stdout and "MLflow: up" in status.stdout
    assert status.stdout.count("SUCCEEDED") == 3, status.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("pllm-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["plain", "submit"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["loss"] > 0 for r in runs)
    versions = client.search_model_versions("name='pllm-tiny'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
    champion = client.get_model_version_by_alias("pllm-tiny", "champion")
    # Version 2 took the alias only if its validation ELBO beat version 1's (the run says which).
    second = next(v for v in versions if v.version == "2")
    decision = client.get_run(second.run_id).data.tags["pllm.alias_decision"]
    assert champion.version == ("2" if "moved from version 1" in decision else "1"), decision

    # serve_config.yaml as shipped (models:/pllm-tiny@champion, tracking URI null), on a free port, 1 replica.
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = SERVE_PORT
    args = config["applications"][0]["args"]
    assert args["model"] == "models:/pllm-tiny@champion" and args["mlflow_uri"] is None
    args.update(min_replicas=1, max_replicas=1)
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(config))
    serve_env = {**env, "RAY_ADDRESS": state.gcs_address}  # Ray's session folder is not the default one
    answer = serve_until_answered([str(BIN / "serve"), "run", str(tmp_path / "serve_config.yaml")], serve_env,
                                  tmp_path / "serve.log")
    assert answer["model"] == "pllm-tiny" and isinstance(answer["choices"][0]["text"], str)
    assert answer["usage"]["completion_tokens"] > 0
    # `pllm serve` on the cluster, no tracking URI given: it asks the cluster for its tracking server.
    answer = serve_until_answered([sys.executable, "-m", "pllm.cli", "serve", "--model", "models:/pllm-tiny/1",
                                   "--port", str(SERVE_PORT), "--max-replicas", "1"], serve_env,
                                  tmp_path / "pllm-serve.log")
    assert answer["model"] == "pllm-tiny" and answer["usage"]["completion_tokens"] > 0

    stopped = pllm_cluster("stop", "--dir", str(cluster_dir), timeout=120)
    assert stopped.returncode == 0 and "Stopped ray and mlflow" in stopped.stdout
    assert our_processes(str(ray_tmp), str(cluster_dir)) == []
    assert not any(port_in_use("127.0.0.1", p) for p in (RAY_PORT, DASHBOARD_PORT, MLFLOW_PORT, SERVE_PORT))
    assert pllm_cluster("status", "--dir", str(cluster_dir)).returncode == 1
