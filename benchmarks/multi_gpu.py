"""Multi-GPU runs: training scaling through the real Ray Train job, resume after a killed worker, and
Serve throughput / autoscaling with one Generator replica per GPU.

  train   The training job (`python -m pllm.pipelines.train_job`, Ray Train + MLflow) on 1, 2, ... GPUs
          with FSDP2 and with DeepSpeed ZeRO-3, ~1B config, bf16, the same per-GPU batch (weak scaling).
          Reports tokens/s per GPU over the last log window, scaling efficiency against 1 GPU, MFU,
          and per-GPU memory: the peak (activations included) and what is held between steps
          (parameters + optimizer state), which full sharding divides by the GPU count.
  comm    All-gather / reduce-scatter bandwidth between the GPUs (NCCL; gloo on CPU), the interconnect
          the sharded jobs depend on, in nccl-tests' algbw / busbw terms.
  resume  The same job on N GPUs; one Ray Train worker is SIGKILLed as the second checkpoint is written.
          The job must finish at exactly num_train_steps optimizer steps, resumed from a checkpoint.
  serve   The Serve app (HTTP ingress + Generator replicas of one GPU each) under a closed-loop HTTP
          load: completion tokens/s with 1..R fixed replicas, then autoscaling min=1..max=R as the load
          rises and falls (replica count sampled every second).

  python benchmarks/multi_gpu.py train --gpus 1 2                  # GPU machine, ~1B
  python benchmarks/multi_gpu.py resume --gpus 2 --steps 30 --save-interval 10
  python benchmarks/multi_gpu.py comm --gpus 2 4
  python benchmarks/multi_gpu.py serve --replicas 2
  python benchmarks/multi_gpu.py train --device cpu --size tiny --gpus 1 2   # CPU smoke run (gloo)
A run split over several calls continues with `train --append`; `serve --autoscale-only` skips the
fixed-replica runs; `--set KEY=VALUE` passes job config overrides (A/B runs).
Results: benchmarks/results/multi_gpu_{train_<strategies>,resume,serve,serve_autoscale,comm}_<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"1b": "pllm/configs/gpu-1b.yaml", "125m": "pllm/configs/gpu-125m.yaml", "tiny": "pllm/configs/tiny.yaml"}
STRATEGIES = {  # name -> --set overrides
    "fsdp2": ["training.use_fsdp=true", "training.use_deepspeed=false"],
    "zero3": ["training.use_fsdp=false", "training.use_deepspeed=true", "training.zero_stage=3"],
}


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "date": time.strftime("%Y-%m-%d"), "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), gpus_visible=torch.cuda.device_count())
    return env


def write(results: dict, name: str, table: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"multi_gpu_{name}_{results['env']['device']}"
    path.with_suffix(".json").write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text(f"`{results['env']['command']}` ({results['env'].get('gpu', 'cpu')}, "
                                       f"{results['env']['date']})\n\n{table}\n")
    print(table)
    return path


# -- training ------------------------------------------------------------------------------------
def job_command(args, strategy: str, workers: int, out: Path, *extra: str) -> list[str]:
    gpu = args.device == "cuda"
    sets = [f"cluster.num_workers={workers}", f"cluster.use_gpu={str(gpu).lower()}",
            f"cluster.cpus_per_worker={args.cpus_per_worker}", f"data.max_files={args.max_files}",
            "data.validation_fraction=0.05", f"training.num_train_steps={args.steps}",
            f"training.log_interval={args.log_interval}", "training.warmup_steps=5", "training.eval_interval=100000",
            "training.eval_batches=1", "training.save_interval=100000", f"training.gradient_accumulation_steps={args.accum}",
            "generation.max_new_tokens=16", "generation.num_refinement_steps=8", *STRATEGIES[strategy], *args.set,
            *extra]
    if args.batch_size:
        sets.append(f"training.batch_size={args.batch_size}")
    if args.seq_len:
        sets.append(f"training.seq_len={args.seq_len}")
    cmd = [sys.executable, "-m", "pllm.pipelines.train_job", "--config", str(ROOT / CONFIGS[args.size]),
           "--output", str(out), "--mlflow-uri", f"sqlite:///{out.parent / 'mlflow.db'}", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


class RayHead:
    """One `ray start --head` for all the jobs of a run (`ray job submit` style: each job's driver joins
    it through RAY_ADDRESS), so each job skips Ray's start-up."""

    def __init__(self, num_cpus: int):
        self.ray = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, also where it is not on PATH
        subprocess.run([*self.ray, "start", "--head", f"--num-cpus={num_cpus}", "--include-dashboard=false",
                        "--disable-usage-stats"], check=True, capture_output=True, timeout=180)
        os.environ["RAY_ADDRESS"] = "auto"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.environ.pop("RAY_ADDRESS", None)
        subprocess.run([*self.ray, "stop", "--force"], capture_output=True, timeout=180)


def run_job(cmd: list[str], log_path: Path, timeout: float) -> float:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}): {shlex.join(cmd)}\n{log_path.read_text()[-4000:]}")
    return time.perf_counter() - start


def train(args) -> None:
    rows = []
    previous = args.out / f"multi_gpu_train_{'_'.join(args.strategies)}_{args.device}.json"
    if args.append and previous.exists():  # continue a run cut short (or split over device calls)
        rows = json.loads(previous.read_text())["rows"]
    for strategy in args.strategies:
        for n in args.gpus:
            if any(r["strategy"] == strategy and r["gpus"] == n for r in rows):
                continue
            out = args.work / f"train-{strategy}-{n}"
            wall = run_job(job_command(args, strategy, n, out), args.work / f"train-{strategy}-{n}.log", args.timeout)
            m = json.loads((out / "metrics.json").read_text())
            assert m["world_size"] == n and m["step"] == args.steps, m
            rows.append({"strategy": strategy, "gpus": n, "tokens_per_s": m["tokens_per_s"],
                         "tokens_per_s_per_gpu": m["tokens_per_s"] / n, "mfu": m.get("mfu"),
                         "peak_memory_gib": m.get("peak_memory_gib"), "state_memory_gib": m.get("state_memory_gib"),
                         "loss": m["loss"], "job_wall_s": wall})
            print(json.dumps(rows[-1]), flush=True)
            report_train(args, rows)  # after every job: a run cut short still leaves its rows


def report_train(args, rows: list[dict]) -> None:
    for row in rows:
        base = next(r for r in rows if r["strategy"] == row["strategy"])
        row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        if row["state_memory_gib"]:
            row["state_memory_reduction"] = base["state_memory_gib"] / row["state_memory_gib"]
            row["ideal_reduction"] = row["gpus"] / base["gpus"]
    results = {"env": environment(args.device), "size": args.size, "steps": args.steps, "rows": rows}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    table = ["| strategy | GPUs | tok/s | tok/s per GPU | scaling eff. | MFU | peak mem/GPU (GiB) | "
             "params+optim/GPU (GiB) | reduction (ideal) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['strategy']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{r['scaling_efficiency']:.1%} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_memory_gib'], '.1f')} | "
                     f"{fmt(r['state_memory_gib'], '.1f')} | "
                     f"{fmt(r.get('state_memory_reduction'), '.2f')}x ({fmt(r.get('ideal_reduction'), '.0f')}x) |")
    path = write(results, "train_" + "_".join(args.strategies), "\n".join(table), args.out)
    plot_train(rows, path.with_suffix(".png"))


def plot_train(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == strategy]
        a.plot([r["gpus"] for r in rs], [r["tokens_per_s_per_gpu"] for r in rs], "o-", label=strategy)
        if rs[0]["state_memory_gib"]:
            b.plot([r["gpus"] for r in rs], [r["state_memory_gib"] for r in rs], "o-", label=f"{strategy} params+optim")
            b.plot([r["gpus"] for r in rs], [r["peak_memory_gib"] for r in rs], "s--", label=f"{strategy} peak")
    a.set(xlabel="GPUs", ylabel="tokens/s per GPU", title="weak scaling", ylim=(0, None))
    b.set(xlabel="GPUs", ylabel="GiB per GPU", title="memory per GPU", ylim=(0, None))
    for ax in (a, b):
        ax.set_xticks(sorted({r["gpus"] for r in rows}))
        if ax.get_legend_handles_labels()[0]:  # no memory lines on CPU
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- resume after a killed worker ------------------------------------------------------------------
def _train_workers():
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in c for c in p.info["cmdline"] or [])]


def resume(args) -> None:
    n, save = args.gpus[-1], args.save_interval
    if args.steps <= 2 * save:
        raise SystemExit(f"resume needs --steps > 2 x --save-interval ({2 * save}): it kills at the second checkpoint")
    out = args.work / f"resume-{n}"
    cmd = job_command(args, args.strategies[0], n, out, f"training.save_interval={save}")
    log_path = args.work / f"resume-{n}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        killed_at, victim = None, None
        while proc.poll() is None and time.perf_counter() - start < args.timeout:
            # Kill once the second checkpoint's folder appears: the first is then complete (a checkpoint
            # counts only when every rank has reported it, and a kill during the first one's report
            # leaves nothing to resume from, so the group would rightly start again at step 0).
            if list((out / "ray").glob(f"*/checkpoint-{2 * save:07d}")) and _train_workers():
                victim = _train_workers()[-1].pid
                os.kill(victim, signal.SIGKILL)
                killed_at = time.perf_counter() - start
                break
            time.sleep(0.5)
        rc = proc.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - start)))
    if rc != 0 or victim is None:
        raise RuntimeError(f"rc={rc}, killed={victim}\n{log_path.read_text()[-4000:]}")
    m = json.loads((out / "metrics.json").read_text())
    ok = m["step"] == args.steps and m["optimizer_steps"] == args.steps and m["resumed_from_step"] >= save
    results = {"env": environment(args.device), "strategy": args.strategies[0], "gpus": n, "steps": args.steps,
               "save_interval": save, "killed_pid": victim, "killed_at_s": killed_at,
               "resumed_from_step": m["resumed_from_step"], "final_step": m["step"],
               "optimizer_steps": m["optimizer_steps"], "tokens_seen": m["tokens_seen"], "loss": m["loss"],
               "job_wall_s": time.perf_counter() - start, "passed": ok}
    table = ("| strategy | GPUs | killed at | resumed from step | final step | optimizer steps | job wall | result |\n"
             "|---|---:|---:|---:|---:|---:|---:|---|\n"
             f"| {results['strategy']} | {n} | {killed_at:.0f} s | {m['resumed_from_step']} | {m['step']} | "
             f"{m['optimizer_steps']} | {results['job_wall_s']:.0f} s | {'ok' if ok else 'FAILED'} |")
    write(results, "resume", table, args.out)
    if not ok:
        raise SystemExit("resume check failed")


# -- collective bandwidth ------------------------------------------------------------------------
def _comm_worker(rank: int, world: int, port: int, device: str, sizes_mib: list[int], iters: int, out: str) -> None:
    """All-gather and reduce-scatter of bf16 tensors (what FSDP2 and ZeRO-3 run every step)."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    # torch >= 2.13 names them *_single; older releases *_into_tensor / *_tensor (same arguments)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for mib in sizes_mib:
        n = max(world, mib * 2**20 // 2 // world * world)  # bf16 elements of the gathered tensor
        full = torch.zeros(n, dtype=torch.bfloat16, device=dev)
        shard = torch.ones(n // world, dtype=torch.bfloat16, device=dev)
        for name, op in (("all_gather", lambda: all_gather(full, shard)),
                         ("reduce_scatter", lambda: reduce_scatter(shard, full))):
            op()  # warm-up (NCCL sets up its channels on first use)
            sync()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                op()
            sync()
            seconds = (time.perf_counter() - start) / iters
            algbw = 2 * n / seconds / 1e9  # GB/s of the whole tensor
            # nccl-tests' bus bandwidth: each rank sends and receives (world - 1) / world of it
            rows.append({"op": name, "gpus": world, "mib": 2 * n / 2**20, "ms": seconds * 1e3, "algbw_gbs": algbw,
                         "busbw_gbs": algbw * (world - 1) / world})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def comm(args) -> None:
    import socket

    import torch.multiprocessing as mp

    rows = []
    for n in [g for g in args.gpus if g > 1]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = args.work / f"comm-{n}.json"
        mp.spawn(_comm_worker, args=(n, port, args.device, args.comm_sizes, args.comm_iters, str(out)), nprocs=n)
        rows += json.loads(out.read_text())
    results = {"env": environment(args.device), "rows": rows,
               "env_vars": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE")}}
    table = ["| op | GPUs | size | time | algbw | busbw |", "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['op']} | {r['gpus']} | {r['mib']:,.0f} MiB | {r['ms']:.3f} ms | {r['algbw_gbs']:,.1f} GB/s | "
              f"{r['busbw_gbs']:,.1f} GB/s |" for r in rows]
    write(results, "comm", "\n".join(table), args.out)


# -- serving -------------------------------------------------------------------------------------
def make_served_model(args, path: Path) -> Path:
    """Random weights of the config's shape (step cost does not depend on them) and a small BPE tokenizer."""
    import glob

    import torch
    import yaml

    from pllm import DiffusionTransformer, ModelConfig, Tokenizer, save_pretrained

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py")))
    tokenizer = Tokenizer.train([Path(f).read_text() for f in files], vocab_size=1024)
    cfg = yaml.safe_load((ROOT / CONFIGS[args.size]).read_text())["model"]
    cfg.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               mask_token_id=tokenizer.mask_token_id, use_flash_attention=False)
    if args.device == "cpu":
        cfg["dtype"] = "float32"
    torch.manual_seed(0)
    return save_pretrained(DiffusionTransformer(ModelConfig.from_dict(cfg)), path, tokenizer)


async def closed_loop(url: str, body: dict, level, done, on_tick=None) -> dict:
    """Clients send requests back to back: `level(t)` of them are active at t seconds; `done(t)` ends
    the run; `on_tick(t)` is called every second (sampling)."""
    import aiohttp

    start, tokens, latencies = time.perf_counter(), 0, []
    stop = asyncio.Event()
    elapsed = lambda: time.perf_counter() - start  # noqa: E731

    async def client(i: int, session) -> None:
        nonlocal tokens
        while not stop.is_set():
            if i >= level(elapsed()):
                await asyncio.sleep(0.2)
                continue
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data}")
            if not stop.is_set():
                tokens += data["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)

    async def ticker() -> None:
        while not done(elapsed()):
            if on_tick is not None:
                on_tick(elapsed())
            await asyncio.sleep(1.0)
        stop.set()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [asyncio.create_task(client(i, session)) for i in range(level.peak)]
        await ticker()
        duration = elapsed()
        await asyncio.gather(*clients)
    latencies.sort()
    return {"tokens_per_s": tokens / duration, "requests": len(latencies), "duration_s": duration,
            "p50_latency_s": latencies[len(latencies) // 2] if latencies else None}


class Load:
    """A client count, constant or set by the autoscaling phases."""

    def __init__(self, clients: int, peak: int | None = None):
        self.clients, self.peak = clients, peak or clients

    def __call__(self, t: float) -> int:
        return self.clients


class AutoscalePhases(Load):
    """low load for `phase_s`; high load until every replica runs, then `phase_s` more; no load until
    back to one replica, then `phase_s` more (each phase capped at `limit_s`)."""

    def __init__(self, low: int, high: int, max_replicas: int, phase_s: float, limit_s: float, replicas):
        super().__init__(low, high)
        self.low, self.high, self.max_replicas, self.phase_s, self.limit_s = low, high, max_replicas, phase_s, limit_s
        self.replicas, self.phase, self.since, self.target_since = replicas, "low", 0.0, None
        self.samples: list[dict] = []
        self.events: dict[str, float] = {}

    def tick(self, t: float) -> None:
        n = self.replicas()
        self.samples.append({"t": t, "phase": self.phase, "clients": self.clients, "replicas": n})
        target = self.max_replicas if self.phase == "high" else 1
        if self.phase != "low" and n == target and self.target_since is None:
            self.target_since = t
            self.events[f"{self.phase}_reached_s"] = t - self.since
        over = t - self.since > self.limit_s
        settled = self.target_since is not None and t - self.target_since >= self.phase_s
        if (self.phase == "low" and t - self.since >= self.phase_s) or (self.phase == "high" and (settled or over)):
            self.phase, self.since, self.target_since = ("high", "idle")[self.phase == "high"], t, None
            self.clients = self.high if self.phase == "high" else 0
        elif self.phase == "idle" and (settled or over):
            self.phase = "done"

    def done(self, t: float) -> bool:
        return self.phase == "done"


def serve_bench(args) -> None:
    import ray
    from ray import serve

    from pllm.actors.serve_app import ServeArgs, build_app
    from pllm.config import local_ray_cpus

    model_dir = make_served_model(args, args.work / "served-model")
    # address="local": a new cluster of our own, even where a Ray head (RAY_ADDRESS) is left running
    ray.init(address="local", num_cpus=local_ray_cpus(), include_dashboard=False)
    port = 8000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    gpus = 1 if args.device == "cuda" else 0
    engine = {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": 65536}
    body = {"prompt": "def parse(value):\n" * 8, "max_tokens": args.max_tokens, "steps": args.max_tokens // 2,
            "block_size": 32, "temperature": 0, "ignore_eos": True}
    base = dict(model=str(model_dir), model_name="bench", engine=engine, device=args.device,
                num_gpus_per_replica=gpus, num_cpus_per_replica=1, max_ongoing_requests=2 * args.max_num_seqs)

    def replicas() -> int:
        return serve.status().applications["bench"].deployments["Generator"].replica_states.get("RUNNING", 0)

    fixed = []
    for k in [] if args.autoscale_only else range(1, args.replicas + 1):
        serve.run(build_app(ServeArgs(**base, min_replicas=k, max_replicas=k)), name="bench", route_prefix="/")
        load = Load(k * args.concurrency)
        asyncio.run(closed_loop(url, body, load, lambda t: t >= args.warmup_s))  # CUDA graphs, caches
        r = asyncio.run(closed_loop(url, body, load, lambda t: t >= args.duration_s))
        fixed.append({"replicas": k, "concurrency": k * args.concurrency, **r})
        print(json.dumps(fixed[-1]), flush=True)
        serve.delete("bench")
    for r in fixed:
        r["speedup"] = r["tokens_per_s"] / fixed[0]["tokens_per_s"]
    if fixed:
        report_serve(args, body, engine, fixed)  # kept even if the autoscaling phase is cut short

    # Autoscaling: low load, then a high one above target_ongoing_requests per replica, then none.
    serve.run(build_app(ServeArgs(**base, min_replicas=1, max_replicas=args.replicas,
                                  target_ongoing_requests=args.concurrency / 2, upscale_delay_s=5,
                                  downscale_delay_s=10)), name="bench", route_prefix="/")
    phases = AutoscalePhases(2, args.replicas * args.concurrency, args.replicas, args.phase_s, args.phase_limit_s,
                             replicas)
    auto = asyncio.run(closed_loop(url, body, phases, phases.done, phases.tick))
    serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    samples = phases.samples
    during = lambda phase: [s["replicas"] for s in samples if s["phase"] == phase]  # noqa: E731
    autoscale = {"low_clients": phases.low, "high_clients": phases.high, "phase_s": args.phase_s,
                 "replicas_during_low": max(during("low")), "max_replicas_during_high": max(during("high")),
                 "scale_up_after_s": phases.events.get("high_reached_s"),
                 "scale_down_after_s": phases.events.get("idle_reached_s"), "final_replicas": samples[-1]["replicas"],
                 "tokens_per_s": auto["tokens_per_s"], "timeline": samples}
    report_serve(args, body, engine, fixed, autoscale)
    if autoscale["scale_up_after_s"] is None or autoscale["scale_down_after_s"] is None:
        raise SystemExit("autoscaling did not go up to max_replicas and back to 1")


def report_serve(args, body: dict, engine: dict, fixed: list[dict], autoscale: dict | None = None) -> None:
    results = {"env": environment(args.device), "size": args.size, "request": body, "engine": engine,
               "fixed": fixed, "autoscale": autoscale}
    table = []
    if fixed:
        table += ["| replicas | concurrent clients | tokens/s | vs 1 replica | p50 latency |", "|---:|---:|---:|---:|---:|"]
        table += [f"| {r['replicas']} | {r['concurrency']} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
                  f"{r['p50_latency_s']:.2f} s |" for r in fixed]
    if autoscale:
        up, down = autoscale["scale_up_after_s"], autoscale["scale_down_after_s"]
        table += ["", f"Autoscaling min 1 / max {args.replicas}: {autoscale['replicas_during_low']} replica(s) under "
                  f"{autoscale['low_clients']} clients; {autoscale['max_replicas_during_high']} under "
                  f"{autoscale['high_clients']} clients (all running {'never' if up is None else f'{up:.0f} s'} after "
                  f"the load rose); {autoscale['final_replicas']} at the end (back to 1 "
                  f"{'never' if down is None else f'{down:.0f} s'} after the load stopped)."]
    path = write(results, "serve" if fixed else "serve_autoscale", "\n".join(table), args.out)
    plot_serve(fixed, autoscale["timeline"] if autoscale else [], path.with_suffix(".png"))


def plot_serve(fixed: list[dict], samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if fixed:
        a.plot([r["replicas"] for r in fixed], [r["tokens_per_s"] for r in fixed], "o-")
        a.set_xticks([r["replicas"] for r in fixed])
        a.set(xlabel="Generator replicas", ylabel="completion tokens/s", title="throughput", ylim=(0, None))
    else:
        a.axis("off")
    t = [s["t"] for s in samples]
    b.step(t, [s["replicas"] for s in samples], where="post", label="running replicas")
    b2 = b.twinx()
    b2.step(t, [s["clients"] for s in samples], where="post", color="tab:orange", alpha=0.6, label="clients")
    b.set(xlabel="seconds", ylabel="replicas", title="autoscaling")
    b2.set_ylabel("concurrent clients")
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="upper right", fontsize=8)
    a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "resume", "serve", "comm"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default=None, choices=list(CONFIGS), help="default: 1b on cuda, tiny on cpu")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="Ray Train workers (one GPU each)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--batch-size", type=int, default=None, help="per GPU (default: the config's)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--save-interval", type=int, default=10, help="resume: checkpoint every N steps")
    p.add_argument("--cpus-per-worker", type=float, default=4)
    p.add_argument("--max-files", type=int, default=1000, help="built-in corpus files")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32, help="serve: clients per replica")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup-s", type=float, default=10)
    p.add_argument("--duration-s", type=float, default=30)
    p.add_argument("--phase-s", type=float, default=10, help="autoscaling: low load, and time held after each change")
    p.add_argument("--phase-limit-s", type=float, default=180, help="autoscaling: longest wait for a change")
    p.add_argument("--timeout", type=float, default=900, help="per training job")
    p.add_argument("--append", action="store_true", help="train: keep the rows already in --out, run the rest")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train/resume: extra job config overrides (repeatable), e.g. training.gradient_checkpointing=false")
    p.add_argument("--autoscale-only", action="store_true", help="serve: skip the fixed-replica runs")
    p.add_argument("--comm-sizes", type=int, nargs="+", default=[16, 128, 1024], help="comm: MiB per tensor")
    p.add_argument("--comm-iters", type=int, default=20)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "multi_gpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    args.size = args.size or ("1b" if args.device == "cuda" else "tiny")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        have = torch.cuda.device_count()
        need = max(args.gpus) if args.what != "serve" else args.replicas
        if need > have:
            raise SystemExit(f"asked for {need} GPUs, {have} visible")
    if args.what in ("serve", "comm"):
        {"serve": serve_bench, "comm": comm}[args.what](args)
        return
    from pllm.config import local_ray_cpus

    with RayHead(local_ray_cpus()):
        {"train": train, "resume": resume}[args.what](args)


if __name__ == "__main__":
    main()
