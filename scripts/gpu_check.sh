#!/usr/bin/env bash
# On one GPU machine: the GPU tests, then the Ray training job on the GPU with FSDP2 (bf16 policy,
# torch.compile) and with DeepSpeed ZeRO-3 (bf16) on the ~125M config, briefly. Prints each run's
# metrics (tokens/s, MFU), then the serving benchmark. Usage: bash scripts/gpu_check.sh [OUTPUT_DIR]
set -uo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
# Kernels and CUDA-graph steps against their references, on the GPU path.
python -m pytest -q tests/test_kernels.py tests/test_cuda_graphs.py -p no:cacheprovider
common=(--config pllm/configs/gpu-125m.yaml --mlflow-uri "sqlite:///$(realpath "$out")/mlflow.db" --no-progress
        --set cluster.num_workers=1 --set cluster.cpus_per_worker=4 --set data.max_files=400
        --set training.num_train_steps=60 --set training.warmup_steps=10 --set training.log_interval=10
        --set training.eval_interval=60 --set training.eval_batches=2 --set training.save_interval=30
        --set training.seq_len=1024 --set training.batch_size=16 --set generation.max_new_tokens=32)
python -m pllm.pipelines.train_job "${common[@]}" --output "$out/fsdp2" 2>&1 | tail -n 25
python -m pllm.pipelines.train_job "${common[@]}" --output "$out/zero3" --set training.use_fsdp=false \
    --set training.use_deepspeed=true --set training.zero_stage=3 --set training.use_torch_compile=false 2>&1 | tail -n 25
for run in fsdp2 zero3; do echo "== $run"; cat "$out/$run/metrics.json"; done
# Serving engine: continuous vs static batching under Poisson load (benchmarks/RESULTS.md).
python benchmarks/serving.py --size 125m --device cuda --rates 5 15 30 --num-requests 200 --out "$out"
