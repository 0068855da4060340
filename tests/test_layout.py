"""The checkout imports exactly like the installed package: every module lives under pllm/ (folder path =
import path), and no top-level folder shadows a PyPI package (transformers imports the PyPI `kernels`), neither
from the checkout root nor in a Ray job whose working directory is the checkout."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = ("from transformers import LlamaConfig; import pllm, pllm.kernels, pllm.actors.serve_app, "
           "pllm.pipelines.train_job, pllm.cluster.cli, parallel_llm.kernels")


def test_only_pllm_and_its_alias_are_packages_at_the_top():
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["parallel_llm", "pllm"]


def test_every_folder_with_modules_under_pllm_is_a_package():
    # A folder without __init__.py would be left out of the wheel (setuptools' find) though it imports here.
    folders = {p.parent for p in (REPO / "pllm").rglob("*.py")} | {p.parent for p in (REPO / "pllm").rglob("*.yaml")}
    missing = [str(f.relative_to(REPO)) for f in folders if "__pycache__" not in f.parts and
               not (f / "__init__.py").is_file()]
    assert missing == []


def test_from_the_checkout_root_transformers_and_pllm_import():
    # `python -c` and `python -m` put the current folder first on sys.path: the checkout root here.
    found = subprocess.run([sys.executable, "-c", f"{IMPORTS}; print(pllm.__file__)"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    assert Path(found.stdout.strip()) == REPO / "pllm" / "__init__.py"
    job_help = subprocess.run([sys.executable, "-m", "pllm.pipelines.train_job", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert job_help.returncode == 0 and "--config" in job_help.stdout, job_help.stderr[-3000:]


def test_in_a_ray_job_working_dir_the_shipped_checkout_is_what_imports(tmp_path):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"working_dir": str(REPO), "excludes": [".git", ".venv", ".device", "runs", "benchmarks"]})
    try:
        @ray.remote
        def imports() -> tuple[str, str]:
            import os

            exec(IMPORTS, {})
            import pllm

            return os.getcwd(), pllm.__file__

        cwd, pllm_file = ray.get(imports.remote())
    finally:
        ray.shutdown()
    assert Path(cwd) != REPO and Path(pllm_file).is_relative_to(cwd)  # Ray's copy, not this checkout
