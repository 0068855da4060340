"""What `pllm cluster start` leaves in its folder: DIR/cluster.json (addresses, ports, process ids,
tracking URI) and DIR/logs/. Every other cluster command reads it back from there."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

STATE_FILE = "cluster.json"


def default_cluster_dir() -> Path:
    return Path("~/.pllm/cluster").expanduser()


@dataclass(frozen=True)
class ClusterOptions:
    """The knobs of `pllm cluster start`."""

    dir: Path
    host: str = "127.0.0.1"  # MLflow server and Ray dashboard bind here; 0.0.0.0 exposes them
    ray_port: int = 6379
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    agent_port: int | None = None  # the head's dashboard agent (job submission goes through it); None: a free one
    num_cpus: int | None = None  # logical CPUs of the Ray head (default: twice the cores, at least 8)
    ray_temp_dir: Path | None = None  # Ray's session folder (default /tmp/ray, where `serve run` looks)
    ray_auth: str = "token"  # Ray's RAY_AUTH_MODE: "token" (clients send ~/.ray/auth_token) or "disabled"
    start_timeout_s: float = 300.0  # how long each service may take to answer (slow on a busy machine)


@dataclass(frozen=True)
class ProcessRecord:
    """A process we started; the creation time guards against a recycled pid."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> "ProcessRecord":
        return cls(pid, psutil.Process(pid).create_time())

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.create_time and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


@dataclass(frozen=True)
class ClusterState:
    dir: str
    host: str
    node_ip: str
    ray_port: int
    dashboard_port: int
    mlflow_port: int
    agent_port: int
    ray_temp_dir: str | None
    ray_auth: str
    ray: ProcessRecord  # `ray start --head --block`: stopping it stops the whole Ray node
    mlflow: ProcessRecord  # `mlflow server`

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.ray_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.dashboard_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{_client_host(self.host)}:{self.mlflow_port}"

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.update(gcs_address=self.gcs_address, dashboard_url=self.dashboard_url, tracking_uri=self.tracking_uri)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ClusterState":
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in fields}  # derived entries are recomputed
        data["ray"], data["mlflow"] = ProcessRecord(**data["ray"]), ProcessRecord(**data["mlflow"])
        return cls(**data)


def _client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def state_path(cluster_dir: str | Path) -> Path:
    return Path(cluster_dir).expanduser() / STATE_FILE


def logs_dir(cluster_dir: str | Path) -> Path:
    return Path(cluster_dir).expanduser() / "logs"


def load_state(cluster_dir: str | Path) -> ClusterState | None:
    path = state_path(cluster_dir)
    if not path.exists():
        return None
    try:
        return ClusterState.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a cluster record of this version ({exc}); stop its processes by hand "
                         f"and delete it") from exc


def save_state(state: ClusterState) -> Path:
    path = state_path(state.dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)  # readers never see half a file
    return path


def remove_state(cluster_dir: str | Path) -> None:
    state_path(cluster_dir).unlink(missing_ok=True)
