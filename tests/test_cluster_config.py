"""The shipped configs are valid: every job config under pllm/configs/, and ray_cluster.yaml against the
Ray cluster launcher's own schema."""

from pathlib import Path

import pytest
import yaml

from pllm.config import JobConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "pllm" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_validate(path):
    job = JobConfig.from_yaml(path)
    if path.name.startswith("gpu"):
        assert job.cluster.use_gpu and job.training.mixed_precision == "bf16"
        assert job.training.use_fsdp != job.training.use_deepspeed


def test_ray_cluster_yaml_passes_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] in types and "gpu_worker" in types
    assert any("pip install" in cmd for cmd in config["setup_commands"])


def test_ray_cluster_yaml_shares_one_tracking_server():
    """The head starts the MLflow server before Ray, and every node's Ray runs with MLFLOW_TRACKING_URI
    pointing at it (the launcher's twin of `pllm cluster start`)."""
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    head = config["head_start_ray_commands"]
    server = next(i for i, cmd in enumerate(head) if "mlflow server" in cmd)
    ray_head = next(i for i, cmd in enumerate(head) if "ray start --head" in cmd)
    assert server < ray_head and "--artifacts-destination" in head[server]
    assert "MLFLOW_TRACKING_URI=http://" in head[ray_head] and ":5000" in head[ray_head]
    worker = next(cmd for cmd in config["worker_start_ray_commands"] if "ray start" in cmd)
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker


def test_serve_config_is_local_and_uses_the_clusters_tracking_server():
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    args = config["applications"][0]["args"]
    assert args["mlflow_uri"] is None and args["model"].startswith("models:/")
