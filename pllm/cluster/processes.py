"""Start and stop the two long-lived services of a local cluster: an MLflow tracking server and a Ray
head whose environment points every job, Train worker and Serve replica at that server.

Both run in their own process groups, detached from the starting shell. Stopping signals exactly the
groups recorded in DIR/cluster.json: `ray stop` would also kill unrelated Ray instances of this user
(for example another program's `ray.init()`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from pllm.cluster.state import (ClusterOptions, ClusterState, ProcessRecord, load_state, logs_dir, remove_state,
                                save_state)
from pllm.config import local_ray_cpus

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A cluster command cannot proceed; the message says why and what to do."""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def mlflow_health_url(state_or_uri: ClusterState | str) -> str:
    uri = state_or_uri if isinstance(state_or_uri, str) else state_or_uri.tracking_uri
    return f"{uri}/health"


def ray_health_urls(state: ClusterState) -> list[str]:
    """Ray accepts jobs once both answer: the dashboard (GCS health, its one route without an auth token)
    and the head's dashboard agent, through which the dashboard submits jobs."""
    return [f"{state.dashboard_url}/api/gcs_healthz", f"http://{state.node_ip}:{state.agent_port}/api/healthz"]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_ip() -> str:
    """The address Ray gives the head node (and so its GCS)."""
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def head_environment(tracking_uri: str, ray_auth: str) -> dict[str, str]:
    """The Ray head's environment, inherited by job drivers, Train workers and Serve replicas: the shared
    tracking server, and this interpreter's bin folder first on PATH (so a job's `python` is this one)."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = ray_auth  # explicit: otherwise Ray picks token mode only where a token file exists
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p != bin_dir)])
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.pop("RAY_ADDRESS", None)  # `ray start --head` starts a cluster; it must not try to join one
    return env


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ClusterError(f"`{name}` not found next to {sys.executable} or on PATH; install the project's "
                           f"dependencies into this environment")
    return found


def auth_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_auth_token() -> None:
    """Token mode needs a token on this machine; Ray's CLI makes one (~/.ray/auth_token) if none exists."""
    if os.environ.get("RAY_AUTH_TOKEN") or auth_token_path().is_file():
        return
    subprocess.run([_executable("ray"), "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL)


def auth_headers(state: ClusterState) -> dict[str, str]:
    """Headers for the dashboard's HTTP API (job submission), which Ray's client sends only when
    RAY_AUTH_MODE=token is set in the calling process."""
    if state.ray_auth != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN") or auth_token_path().read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def _spawn(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> ProcessRecord:
    log.info("starting %s (log: %s)", " ".join(cmd), log_file)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # its own group: outlives this command, stopped as one
    return ProcessRecord.of(proc.pid)


def _wait_until_up(name: str, urls: list[str], proc: ProcessRecord, log_file: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = log_file.read_text(errors="replace")[-3000:]
            raise ClusterError(f"{name} exited during startup; its log {log_file} ends with:\n{tail}")
        if all(http_ok(url) for url in urls):
            return
        time.sleep(0.5)
    raise ClusterError(f"{name} did not answer at {' and '.join(urls)} within {timeout_s:.0f} s; see {log_file}")


def running_parts(state: ClusterState) -> dict[str, bool]:
    return {"ray": state.ray.alive(), "mlflow": state.mlflow.alive()}


def start_cluster(options: ClusterOptions) -> ClusterState:
    """Start the MLflow server, wait for it, then the Ray head; record both in DIR/cluster.json."""
    cluster_dir = Path(options.dir).expanduser().resolve()
    previous = load_state(cluster_dir)
    if previous is not None and any(running_parts(previous).values()):
        raise ClusterError(f"a cluster is already running from {cluster_dir} (dashboard {previous.dashboard_url}, "
                           f"tracking {previous.tracking_uri}); stop it first: pllm cluster stop --dir {cluster_dir}")
    for what, port in [("MLflow", options.mlflow_port), ("Ray GCS", options.ray_port),
                       ("Ray dashboard", options.dashboard_port)]:
        if port_in_use(options.host, port):
            raise ClusterError(f"port {port} on {options.host} (for the {what}) is already in use; "
                               f"free it or choose another port")
    if options.ray_auth == "token":
        ensure_auth_token()
    logs = logs_dir(cluster_dir)
    logs.mkdir(parents=True, exist_ok=True)
    (cluster_dir / "mlartifacts").mkdir(exist_ok=True)

    mlflow_log = logs / "mlflow.log"
    mlflow_proc = _spawn([_executable("mlflow"), "server",
                          "--backend-store-uri", f"sqlite:///{cluster_dir / 'mlflow.db'}",
                          "--artifacts-destination", str(cluster_dir / "mlartifacts"),
                          "--host", options.host, "--port", str(options.mlflow_port), "--workers", "1"],
                         mlflow_log)
    state = ClusterState(dir=str(cluster_dir), host=options.host, node_ip=node_ip(), ray_port=options.ray_port,
                         dashboard_port=options.dashboard_port, mlflow_port=options.mlflow_port,
                         agent_port=options.agent_port or free_port(options.host),
                         ray_temp_dir=str(options.ray_temp_dir) if options.ray_temp_dir else None,
                         ray_auth=options.ray_auth,
                         ray=ProcessRecord(0, 0.0), mlflow=mlflow_proc)
    try:
        _wait_until_up("MLflow server", [mlflow_health_url(state)], mlflow_proc, mlflow_log, options.start_timeout_s)
        ray_log = logs / "ray.log"
        cmd = [_executable("ray"), "start", "--head", "--block", "--disable-usage-stats",
               f"--port={options.ray_port}",
               "--include-dashboard=true", f"--dashboard-host={options.host}",
               f"--dashboard-port={options.dashboard_port}", f"--dashboard-agent-listen-port={state.agent_port}"]
        cmd.append(f"--num-cpus={options.num_cpus or local_ray_cpus()}")
        if options.ray_temp_dir is not None:
            cmd.append(f"--temp-dir={options.ray_temp_dir}")
        ray_proc = _spawn(cmd, ray_log, env=head_environment(state.tracking_uri, state.ray_auth))
        state = dataclasses.replace(state, ray=ray_proc)
        save_state(state)  # recorded before the wait, so `stop` can clean up a head that never answers
        _wait_until_up("Ray head", ray_health_urls(state), ray_proc, ray_log, options.start_timeout_s)
    except BaseException:
        stop_cluster(cluster_dir, state)
        raise
    return state


def _stop_group(name: str, proc: ProcessRecord, timeout_s: float) -> bool:
    """SIGTERM the process (Ray's `--block` head then shuts its node down), then SIGKILL what is left of its
    process group. Returns whether anything was running."""
    if proc.pid <= 0:
        return False
    was_alive = proc.alive()
    if was_alive:
        log.info("stopping %s (pid %d)", name, proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    leftovers = _group_members(proc)
    if leftovers:
        log.info("killing %d leftover process(es) of %s's group", len(leftovers), name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        psutil.wait_procs(leftovers, timeout=10)
    return was_alive or bool(leftovers)


def _group_members(leader: ProcessRecord) -> list[psutil.Process]:
    """Live processes in the leader's group that are not older than it (so not a recycled group id's)."""
    members = []
    for p in psutil.process_iter():
        try:
            if (os.getpgid(p.pid) == leader.pid and p.create_time() >= leader.create_time
                    and p.status() != psutil.STATUS_ZOMBIE):
                members.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    return members


def stop_cluster(cluster_dir: str | Path, state: ClusterState | None = None, timeout_s: float = 30.0) -> list[str]:
    """Stop what DIR/cluster.json records (Ray first, so no job writes to a vanished server) and remove the
    record. Returns the names of the services that were running; [] when nothing was."""
    state = state or load_state(cluster_dir)
    if state is None:
        return []
    stopped = [name for name, proc in [("ray", state.ray), ("mlflow", state.mlflow)]
               if _stop_group(name, proc, timeout_s)]
    remove_state(cluster_dir)
    return stopped
