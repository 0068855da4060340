"""`pllm cluster` without a running cluster: config validation before anything reaches Ray, the entrypoint
it builds, and start/status/stop on folders with nothing (or something stale, or something live) recorded."""

import socket
import subprocess
from pathlib import Path

import pytest

from pllm.cli import main
from pllm.cluster.jobs import train_entrypoint
from pllm.cluster.processes import ClusterError
from pllm.cluster.state import ClusterState, ProcessRecord, load_state, save_state, state_path
from pllm.config_files import load_job_config, resolve_config_path

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and what the command printed (errors go to stderr, the rest to stdout)."""
    code = main(["cluster", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def record(cluster_dir: Path, ray: ProcessRecord, mlflow: ProcessRecord) -> ClusterState:
    state = ClusterState(dir=str(cluster_dir), host="127.0.0.1", node_ip="127.0.0.1", ray_port=26379,
                         dashboard_port=28265, mlflow_port=25000, agent_port=28266, ray_temp_dir=None, ray_auth="token",
                         ray=ray, mlflow=mlflow)
    save_state(state)
    return state


def dead_process() -> ProcessRecord:
    proc = subprocess.Popen(["sleep", "60"])
    rec = ProcessRecord.of(proc.pid)
    proc.kill()
    proc.wait()
    return rec


@pytest.mark.parametrize("override, field", [("training.num_train_steps=-1", "training.num_train_steps"),
                                             ("training.no_such_field=1", "training.no_such_field"),
                                             ("cluster.num_workers=two", "cluster.num_workers")])
def test_bad_config_fails_before_the_cluster_is_looked_up(tmp_path, capsys, override, field):
    code, out = run_cli(capsys, "submit", "--dir", str(tmp_path), "--config", "tiny", "--set", override)
    assert code == 2
    assert "invalid job config" in out and field in out and "tiny.yaml" in out
    assert "no cluster running" not in out  # it never got as far as the (absent) cluster


def test_unreadable_config_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    code, out = run_cli(capsys, "submit", "--dir", str(tmp_path), "--config", str(bad))
    assert code == 2 and str(bad) in out and "not valid YAML" in out
    code, out = run_cli(capsys, "submit", "--dir", str(tmp_path), "--config", "no-such-config")
    assert code == 2 and "no-such-config" in out and "tiny" in out  # lists the built-in names


def test_valid_config_without_a_cluster_says_how_to_start_one(tmp_path, capsys):
    code, out = run_cli(capsys, "submit", "--dir", str(tmp_path), "--config", "tiny")
    assert code == 1 and "no cluster running" in out and "pllm cluster start" in out


def test_submit_needs_a_config_or_an_entrypoint_not_both(tmp_path, capsys):
    assert run_cli(capsys, "submit", "--dir", str(tmp_path))[0] == 2
    assert run_cli(capsys, "submit", "--dir", str(tmp_path), "--config", "tiny", "--", "echo", "hi")[0] == 2


def test_entrypoint_names_the_config_inside_the_working_dir_and_the_tracking_server(tmp_path):
    config = resolve_config_path("tiny")
    assert config == (REPO / "pllm" / "configs" / "tiny.yaml").resolve()
    overrides = ["training.num_train_steps=5", "data.paths=['a b']"]
    job = load_job_config(config, overrides)
    assert job.training.num_train_steps == 5 and job.data.paths == ["a b"]
    cmd = train_entrypoint(config, overrides, job, "http://127.0.0.1:25000", REPO)
    assert cmd.startswith("python -m pllm.pipelines.train_job --config pllm/configs/tiny.yaml")
    assert "--mlflow-uri http://127.0.0.1:25000" in cmd and "'data.paths=['\"'\"'a b'\"'\"']'" in cmd
    own = load_job_config(config, ["tracking.mlflow_uri=http://elsewhere:5000"])
    assert "--mlflow-uri" not in train_entrypoint(config, [], own, "http://127.0.0.1:25000", REPO)
    with pytest.raises(ClusterError, match="outside the working folder"):
        train_entrypoint(config, [], job, "http://127.0.0.1:25000", tmp_path)


def test_status_and_stop_with_nothing_recorded(tmp_path, capsys):
    code, out = run_cli(capsys, "status", "--dir", str(tmp_path))
    assert code == 1 and "No cluster running" in out
    for _ in range(2):  # idempotent
        code, out = run_cli(capsys, "stop", "--dir", str(tmp_path))
        assert code == 0 and "Nothing running" in out


def test_a_stale_record_reads_as_down_and_stop_clears_it(tmp_path, capsys):
    state = record(tmp_path, dead_process(), dead_process())
    assert load_state(tmp_path) == state
    code, out = run_cli(capsys, "status", "--dir", str(tmp_path))
    assert code == 1 and "Ray:    DOWN" in out and "MLflow: DOWN" in out and "pllm cluster stop" in out
    code, out = run_cli(capsys, "stop", "--dir", str(tmp_path))
    assert code == 0 and "Nothing running" in out and not state_path(tmp_path).exists()


def test_start_refuses_while_the_recorded_cluster_is_alive(tmp_path, capsys):
    live = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record(tmp_path, ProcessRecord.of(live.pid), dead_process())
        code, out = run_cli(capsys, "start", "--dir", str(tmp_path))
        assert code == 1 and "already running" in out and "pllm cluster stop" in out
        assert live.poll() is None  # refusing touches nothing
    finally:
        live.kill()
        live.wait()


def test_start_refuses_a_busy_port_before_starting_anything(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = run_cli(capsys, "start", "--dir", str(tmp_path), "--mlflow-port", str(port))
    assert code == 1 and f"port {port}" in out and "MLflow" in out
    assert not state_path(tmp_path).exists() and not (tmp_path / "logs").exists()
