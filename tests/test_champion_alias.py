"""The registry keeps its champion: a new version takes the alias only with a better validation ELBO
on the same held-out rows (or when forced, or when nobody holds it), in a real MLflow store."""

import pytest
from mlflow.tracking import MlflowClient

from pllm.config import JobConfig
from pllm.pipelines.train_job import validation_set_id
from pllm.registry import champion_decision, experiment_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    exp = experiment_id(client, "pllm", uri)

    def version(val_elbo, validation_set="rows-a"):
        run = client.create_run(exp)
        if val_elbo is not None:
            client.log_metric(run.info.run_id, "val_elbo_nats", val_elbo)
        client.set_tag(run.info.run_id, "pllm.validation_set", validation_set)
        v = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        return run.info.run_id, v.version

    return client, version


def test_the_alias_moves_only_to_a_better_model_on_the_same_rows(store):
    client, version = store
    first, v1 = version(6.04)
    take, reason = champion_decision(client, "m", "champion", first, 6.04, "rows-a")
    assert take and "no version of m held it" in reason
    client.set_registered_model_alias("m", "champion", v1)
    # A job stopped after one step (the 7.60 nats against 6.04): registered, not promoted.
    worse, _ = version(7.60)
    take, reason = champion_decision(client, "m", "champion", worse, 7.60, "rows-a")
    assert not take and f"stays with version {v1}" in reason and "6.0400 <= " in reason
    better, _ = version(5.90)
    take, reason = champion_decision(client, "m", "champion", better, 5.90, "rows-a")
    assert take and "5.9000 < 6.0400" in reason
    # Other held-out rows (another data section) do not compare; no ELBO does not either; force does.
    other, _ = version(5.0, "rows-b")
    assert not champion_decision(client, "m", "champion", other, 5.0, "rows-b")[0]
    assert not champion_decision(client, "m", "champion", other, None, "rows-a")[0]
    take, reason = champion_decision(client, "m", "champion", other, 9.0, "rows-b", force=True)
    assert take and "forced" in reason
    assert client.get_model_version_by_alias("m", "champion").version == v1  # deciding moved nothing


def test_the_validation_set_id_follows_the_held_out_rows():
    base = JobConfig.from_dict({})
    same = JobConfig.from_dict({"training": {"learning_rate": 1e-3, "num_train_steps": 7}})
    other_data = JobConfig.from_dict({"data": {"validation_fraction": 0.2}})
    other_len = JobConfig.from_dict({"training": {"seq_len": 64}})
    assert validation_set_id(base) == validation_set_id(same)  # training settings do not change the rows
    assert len({validation_set_id(c) for c in (base, other_data, other_len)}) == 3
