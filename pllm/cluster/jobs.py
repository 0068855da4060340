"""Submit training jobs to a cluster started by `pllm cluster start`, through Ray's Job Submission API.

The job config is validated here first, so a bad file or `--set` fails before anything reaches Ray.
The working folder (the checkout) travels as the job's working_dir; the tracking URI travels both as
the entrypoint's --mlflow-uri and as $MLFLOW_TRACKING_URI."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from pllm.cluster.processes import ClusterError, auth_headers
from pllm.cluster.state import ClusterState
from pllm.config import JobConfig

log = logging.getLogger(__name__)

TRAIN_MODULE = "pllm.pipelines.train_job"
# Besides .gitignore (which Ray honours), keep local stores and outputs out of the uploaded folder.
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlartifacts", "mlflow.db", "**/__pycache__"]


def train_entrypoint(config: Path, overrides: list[str], job: JobConfig, tracking_uri: str,
                     working_dir: Path) -> str:
    """`python -m pllm.pipelines.train_job --config REL.yaml ...`, the config named relative to the
    working_dir the job runs in; the cluster's tracking server unless the config names its own."""
    try:
        rel = config.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise ClusterError(f"{config} is outside the working folder {working_dir}, which is what the job receives; "
                          f"copy it there or run from a folder that contains it") from None
    args = ["python", "-m", TRAIN_MODULE, "--config", rel.as_posix(), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    if not job.tracking.mlflow_uri:
        args += ["--mlflow-uri", tracking_uri]
    return shlex.join(args)


def _client(state: ClusterState):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(state.dashboard_url, headers=auth_headers(state))


def submit(state: ClusterState, entrypoint: str, working_dir: Path) -> str:
    """Submit `entrypoint` to run in a copy of `working_dir` on the cluster; returns the job id."""
    runtime_env = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES,
                   "env_vars": {"MLFLOW_TRACKING_URI": state.tracking_uri}}
    job_id = _client(state).submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    log.info("submitted %s: %s", job_id, entrypoint)
    return job_id


def follow(state: ClusterState, job_id: str, write: Callable[[str], None] = sys.stdout.write) -> str:
    """Stream the job's logs until it ends; returns its final status (SUCCEEDED, FAILED, STOPPED). If the
    log stream drops (Ray closes the websocket on a busy head), wait for the status and print the rest."""
    client = _client(state)
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            written += len(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as exc:
        log.warning("log stream of %s closed (%s); waiting for the job to end", job_id, exc)
        status = wait_for_job(state, job_id)
        write(client.get_job_logs(job_id)[written:])
        return status
    return str(client.get_job_status(job_id).value)


def wait_for_job(state: ClusterState, job_id: str, poll_s: float = 2.0) -> str:
    """Poll until the job ends; returns its final status."""
    client = _client(state)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return str(status.value)


def job_logs(state: ClusterState, job_id: str) -> str:
    return _client(state).get_job_logs(job_id)


def list_jobs(state: ClusterState) -> list[dict]:
    jobs = sorted(_client(state).list_jobs(), key=lambda j: j.start_time or 0)
    return [{"id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint}
            for j in jobs]
