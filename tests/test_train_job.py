"""The Ray training job for real: a local Ray cluster, Ray Data, 2 Ray Train workers on CPU (gloo),
a sqlite MLflow store and registry; a worker killed mid-run; `ray job submit` to a `ray start` head."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = ["data.max_files=80", "training.eval_interval=20", "training.eval_batches=2", "training.log_interval=5",
         "training.save_interval=10", "cluster.num_workers=2", "tracking.registered_model=pllm-test"]


def job_cmd(tmp_path: Path, *overrides: str) -> list[str]:
    sets = [a for o in [*QUICK, *overrides] for a in ("--set", o)]
    return [sys.executable, "-m", "pllm.pipelines.train_job", "--output", str(tmp_path / "run"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *sets]


def run_job(tmp_path: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(job_cmd(tmp_path, *overrides), cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_bad_config_fails_before_ray_starts(tmp_path):
    # Command-line mistakes are one line naming the problem and exit status 2, not a traceback.
    for override, message in [("training.zero_stage=5", "training.zero_stage: Input should be 0, 1, 2 or 3 (got 5)"),
                              ("training.nope=1", "training.nope: Unexpected keyword argument"),
                              ("data.paths=['/no/such/corpus/*.txt']", "matches no file")]:
        start = time.monotonic()
        proc = subprocess.run(job_cmd(tmp_path, override), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr
        assert "Started a local Ray instance" not in proc.stderr + proc.stdout
        assert time.monotonic() - start < 60


def test_config_is_a_path_or_a_builtin_name_and_a_missing_one_is_named(tmp_path):
    from pllm.config_files import load_job_config

    assert load_job_config("gpu-1b", []).model.hidden_size == load_job_config(
        str(REPO / "pllm" / "configs" / "gpu-1b.yaml"), []).model.hidden_size
    assert load_job_config(None, []).tracking.registered_model == "pllm-tiny"
    proc = subprocess.run([*job_cmd(tmp_path), "--config", "no-such-config.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'no-such-config.yaml': no such file" in proc.stderr
    assert "built-in: gpu-125m, gpu-1b, tiny" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_a_short_budget_trains_and_the_output_reads_clean(tmp_path):
    """A 15-second budget trains for 15 seconds (not counting Ray, worker and data start-up); the
    output, a pipe as in a log file, has no ERROR line and no progress-bar redraws, and its hints
    run as written outside an activated environment."""
    proc = run_job(tmp_path, "training.num_train_steps=100000", "training.max_train_minutes=0.25",
                   "training.use_fsdp=false", "training.eval_interval=100000", "training.save_interval=null")
    assert metrics(tmp_path)["step"] > 5
    output = proc.stdout + proc.stderr
    assert not [line for line in output.splitlines() if "ERROR" in line], output[-5000:]
    assert "\r" not in output
    browse = next(line for line in proc.stdout.splitlines() if line.startswith("Browse it: "))
    mlflow_script = browse.split()[2]
    assert Path(mlflow_script).is_file() and Path(mlflow_script).parent == Path(sys.executable).parent


@pytest.mark.slow
def test_in_process_job_writes_the_same_outputs(tmp_path):
    out = tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "pllm.cli", "train", "--local", "--no-progress", "--output", str(out),
                           *[a for o in ["data.max_files=80", "training.num_train_steps=20", "training.eval_interval=10",
                                         "training.eval_batches=2", "training.log_interval=5"] for a in ("--set", o)]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["step"], m["world_size"]) == (20, 1) and m["unigram_nats"] > 0 and m["generation_nfe"] > 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "loss_curve.png").is_file()
    assert json.loads((out / "job_config.json").read_text())["training"]["num_train_steps"] == 20
    assert "Unigram baseline" in proc.stdout and "MLflow run" not in proc.stdout
    assert "step 5/20: loss=" in proc.stderr and "\r" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr


@pytest.mark.slow
def test_fsdp2_job_logs_to_mlflow_and_registers_a_generating_model(tmp_path):
    run_job(tmp_path, "training.num_train_steps=40", "training.use_fsdp=true")
    m = metrics(tmp_path)
    assert (m["step"], m["optimizer_steps"], m["strategy"], m["world_size"]) == (40, 40, "fsdp2", 2)
    assert m["tokens_seen"] == 40 * 8 * 128 * 2  # global batch: 2 workers x 8 rows x 128 tokens
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()

    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("pllm-test", "champion")
    run = client.get_run(version.run_id)
    assert run.data.params["training.use_fsdp"] == "True" and run.data.params["cluster.num_workers"] == "2"
    losses = [x.value for x in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5  # logged every 5 steps, and it learns
    assert {"val_elbo_nats", "tokens_per_s", "lr", "grad_norm"} <= set(run.data.metrics)
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/pllm-test@champion")
    out = model.predict(["def add(a, b):\n", "import os\n"], params={"max_new_tokens": 8, "num_refinement_steps": 4})
    assert len(out) == 2 and all(isinstance(s, str) and s for s in out)


def _registered_checkpoints(tmp_path) -> list[str]:
    """Checkpoints Ray Train's controller has registered (its snapshot in the storage folder). A
    reported checkpoint counts only once registered: a worker killed before that restarts from
    scratch, which is Ray's behaviour and not what this test is about."""
    names = []
    for snapshot in (tmp_path / "run" / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (ValueError, KeyError, OSError):  # being written
            continue
        names += [r["checkpoint_dir_name"] for r in results if r["checkpoint_dir_name"].startswith("checkpoint-")]
    return names


def _train_workers() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
            procs.append(p)
    return procs


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    """SIGKILL one Ray Train worker once checkpoint 20 is being written and Ray Train's controller has
    registered an earlier one: Ray Train restarts the worker
    group, which loads the latest complete sharded checkpoint and finishes at exactly num_train_steps
    optimizer steps (the Adam step count, not just the loop counter)."""
    steps = 120
    proc = subprocess.Popen(job_cmd(tmp_path, f"training.num_train_steps={steps}", "training.use_fsdp=true"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (list((tmp_path / "run" / "ray").glob("*/checkpoint-0000020")) and _registered_checkpoints(tmp_path)
                and _train_workers()):
            victim = _train_workers()[-1]
            killed = victim.pid
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.5)
    output, _ = proc.communicate(timeout=600)
    assert killed is not None, "the job ended before a checkpoint was written\n" + output[-3000:]
    assert proc.returncode == 0, output[-5000:]
    m = metrics(tmp_path)
    assert m["step"] == steps and m["optimizer_steps"] == steps  # nothing repeated or skipped
    # Checkpoint 20 may still have been uploading when the worker died: then 10 is the last complete one.
    assert m["resumed_from_step"] in (10, 20, 30), m["resumed_from_step"]
    assert m["tokens_seen"] == steps * 8 * 128 * 2


@pytest.mark.slow
def test_ray_job_submit_to_a_local_head_with_deepspeed(tmp_path):
    # `ray` and the job's `python` must be this interpreter's (the head inherits PATH).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # `ray start` clusters require the token (~/.ray/auth_token) by default
    dash_port = 8265 + os.getpid() % 500
    start = subprocess.run(["ray", "start", "--head", "--num-cpus=8", "--port=0", f"--dashboard-port={dash_port}",
                            "--include-dashboard=true", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        job = job_cmd(tmp_path, "training.num_train_steps=20", "training.use_fsdp=false",
                      "training.use_deepspeed=true", "training.zero_stage=2")
        cmd = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash_port}", "--working-dir", str(REPO),
               "--", "python", *job[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout and "Registered model: models:/pllm-test@champion" in proc.stdout
        m = metrics(tmp_path)
        assert (m["step"], m["strategy"], m["world_size"]) == (20, "deepspeed", 2)
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env, timeout=120)
