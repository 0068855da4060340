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
