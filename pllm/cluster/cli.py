"""`pllm cluster start|submit|status|stop`: a local Ray head plus an MLflow tracking server."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pllm.cluster.state import ClusterOptions, ClusterState, default_cluster_dir, load_state, state_path

NEXT_STEPS = """\
Ray dashboard:    {dashboard}
MLflow (UI):      {tracking}   (jobs, Train workers and Serve replicas log here)
State and logs:   {dir}

Next, from the project checkout:
  pllm cluster submit --config pllm/configs/tiny.yaml{dir_flag}
{auth_export}  ray job submit --working-dir . -- python -m pllm.pipelines.train_job --config pllm/configs/tiny.yaml
  serve run serve_config.yaml
  pllm cluster status{dir_flag}
  pllm cluster stop{dir_flag}"""


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """Register the `pllm cluster` command group on the top-level parser's subcommands."""
    cluster = sub.add_parser("cluster", help="start, use and stop a Ray head with an MLflow tracking server")
    commands = cluster.add_subparsers(dest="cluster_command", required=True)

    def with_dir(name: str, help_text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--dir", type=Path, default=default_cluster_dir(),
                       help="the cluster's folder: state, MLflow store, logs (default: ~/.pllm/cluster)")
        return p

    start = with_dir("start", "start an MLflow tracking server and a Ray head that logs to it")
    start.add_argument("--host", default="127.0.0.1", help="interface the MLflow server and Ray dashboard bind")
    start.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the Ray head (default: twice the cores, at least 8)")
    start.add_argument("--ray-port", type=int, default=6379)
    start.add_argument("--dashboard-port", type=int, default=8265)
    start.add_argument("--mlflow-port", type=int, default=5000)
    start.add_argument("--ray-auth", choices=["token", "disabled"], default="token",
                       help="Ray token authentication (token: clients send ~/.ray/auth_token; set "
                            "RAY_AUTH_MODE=token for `ray job submit`)")
    start.add_argument("--ray-temp-dir", type=Path, default=None,
                       help="Ray's session folder (default /tmp/ray; elsewhere, `ray.init()` and `serve run` "
                            "find the cluster only through RAY_ADDRESS)")
    start.set_defaults(func=_cmd_start)

    submit = with_dir("submit", "validate a job config and run the training job on the cluster")
    submit.add_argument("--config", default=None, help="YAML job config, or a built-in name such as tiny")
    submit.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set training.num_train_steps=100")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without following it")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER,
                        help="instead of --config: `-- COMMAND ...`, any entrypoint run in this folder")
    submit.set_defaults(func=_cmd_submit)

    with_dir("status", "whether Ray and MLflow are up, their URLs, and the jobs").set_defaults(func=_cmd_status)
    with_dir("stop", "stop the Ray head and the MLflow server").set_defaults(func=_cmd_stop)


def _dir_flag(cluster_dir: Path) -> str:
    return "" if Path(cluster_dir).expanduser().resolve() == default_cluster_dir().resolve() else f" --dir {cluster_dir}"


def _cmd_start(args: argparse.Namespace) -> int:
    from pllm.cluster.processes import ClusterError, start_cluster

    options = ClusterOptions(dir=args.dir, host=args.host, ray_port=args.ray_port, dashboard_port=args.dashboard_port,
                             mlflow_port=args.mlflow_port, num_cpus=args.num_cpus, ray_temp_dir=args.ray_temp_dir,
                             ray_auth=args.ray_auth)
    try:
        state = start_cluster(options)
    except ClusterError as exc:
        print(f"pllm cluster start: {exc}", file=sys.stderr)
        return 1
    print(f"Cluster running (Ray GCS {state.gcs_address}).")
    print(NEXT_STEPS.format(dashboard=state.dashboard_url, tracking=state.tracking_uri, dir=state.dir,
                            dir_flag=_dir_flag(args.dir),
                            auth_export="  export RAY_AUTH_MODE=token  # Ray's CLI then sends ~/.ray/auth_token\n"
                            if state.ray_auth == "token" else ""))
    if state.ray_temp_dir:
        print(f"Ray's session folder is {state.ray_temp_dir}: set RAY_ADDRESS={state.gcs_address} for `serve run` "
              f"and RAY_ADDRESS={state.dashboard_url} for `ray job submit`.")
    return 0


def _running_state(cluster_dir: Path, command: str) -> ClusterState | None:
    from pllm.cluster.processes import running_parts

    state = load_state(cluster_dir)
    if state is None or not all(running_parts(state).values()):
        print(f"pllm cluster {command}: no cluster running from {cluster_dir}; start one: "
              f"pllm cluster start{_dir_flag(cluster_dir)}", file=sys.stderr)
        return None
    return state


def _cmd_submit(args: argparse.Namespace) -> int:
    from pllm.cluster.jobs import follow, submit, train_entrypoint
    from pllm.cluster.processes import ClusterError
    from pllm.config_files import ConfigFileError, load_job_config, resolve_config_path

    entrypoint_args = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if bool(args.config) == bool(entrypoint_args):
        print("pllm cluster submit: give either --config X.yaml [--set ...] or `-- COMMAND ...`", file=sys.stderr)
        return 2
    working_dir = Path.cwd()
    try:
        if args.config:  # validated before the cluster is even looked up
            config = resolve_config_path(args.config)
            job = load_job_config(config, args.set)
    except ConfigFileError as exc:
        print(f"pllm cluster submit: invalid job config: {exc}", file=sys.stderr)
        return 2
    state = _running_state(args.dir, "submit")
    if state is None:
        return 1
    try:
        entrypoint = (train_entrypoint(config, args.set, job, state.tracking_uri, working_dir) if args.config
                      else shlex.join(entrypoint_args))
    except ClusterError as exc:
        print(f"pllm cluster submit: {exc}", file=sys.stderr)
        return 2
    job_id = submit(state, entrypoint, working_dir)
    print(f"Submitted job {job_id} to {state.dashboard_url}: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"Follow it: ray job logs --follow {job_id} --address {state.dashboard_url}")
        return 0
    status = follow(state, job_id, write=lambda text: print(text, end="", flush=True))
    print(f"\nJob {job_id} {status}. Runs and models: {state.tracking_uri}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from pllm.cluster.processes import http_ok, mlflow_health_url, ray_health_urls, running_parts

    state = load_state(args.dir)
    if state is None:
        print(f"No cluster running from {args.dir} (no {state_path(args.dir).name} there).")
        return 1
    alive = running_parts(state)
    ray_up = alive["ray"] and all(http_ok(url) for url in ray_health_urls(state))
    mlflow_up = alive["mlflow"] and http_ok(mlflow_health_url(state))
    print(f"Ray:    {'up' if ray_up else 'DOWN'}  dashboard {state.dashboard_url}, GCS {state.gcs_address} "
          f"(pid {state.ray.pid})")
    print(f"MLflow: {'up' if mlflow_up else 'DOWN'}  {state.tracking_uri} (pid {state.mlflow.pid})")
    if ray_up:
        from pllm.cluster.jobs import list_jobs

        jobs = list_jobs(state)
        print(f"Jobs ({len(jobs)}):" if jobs else "Jobs: none")
        for job in jobs:
            print(f"  {job['id']}  {job['status']:<9}  {job['entrypoint']}")
    if not (ray_up and mlflow_up):
        print(f"Clean up with: pllm cluster stop{_dir_flag(args.dir)}")
    return 0 if ray_up and mlflow_up else 1


def _cmd_stop(args: argparse.Namespace) -> int:
    from pllm.cluster.processes import stop_cluster

    stopped = stop_cluster(args.dir)
    if stopped:
        print(f"Stopped {' and '.join(stopped)} (cluster in {args.dir}).")
    else:
        print(f"Nothing running from {args.dir}.")
    return 0
