"""The user-facing docs stay true: README's Python blocks run, its `pllm` commands parse and name
files that exist, every relative link in README.md and benchmarks/RESULTS.md resolves, and the
result files under benchmarks/results/ are exactly those the results pages cite."""

from __future__ import annotations

import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_LOG = ROOT / "benchmarks" / "RESULTS_LOG.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def pllm_commands(text: str) -> list[list[str]]:
    """The argument lists of every `pllm ...` line of the bash blocks (continuations joined,
    comments dropped)."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "pllm":
                commands.append(words[1:])
    return commands


def relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link.split("#")[0] for link in links
            if not re.match(r"[a-z][a-z0-9+.-]*:", link) and not link.startswith("#")]


README_TEXT = README.read_text()
PYTHON_BLOCKS = code_blocks(README_TEXT, "python")


def test_the_readme_has_the_blocks_this_test_checks():
    assert PYTHON_BLOCKS, "README.md has no ```python block"
    assert any(cmd[:1] == ["train"] for cmd in pllm_commands(README_TEXT))
    assert any(cmd[:1] == ["serve"] for cmd in pllm_commands(README_TEXT))


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, tmp_path):
    code = PYTHON_BLOCKS[index]
    (tmp_path / "snippet.py").write_text(code)
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README python block {index} failed:\n{proc.stdout}\n{proc.stderr}"
    if "DistributedTrainer(" in code:  # the API snippet: it trains, validates, saves, loads, generates
        elbo = re.search(r"validation ELBO: (\d+\.\d+) nats/token", proc.stdout)
        assert elbo, f"the API snippet printed no validation ELBO:\n{proc.stdout}"
        assert 0 < float(elbo.group(1)) < 20
        assert (tmp_path / "runs" / "api" / "model" / "model.safetensors").exists()
        assert "forward passes" in proc.stdout


@pytest.mark.parametrize("argv", pllm_commands(README_TEXT), ids=lambda a: " ".join(a[:2]))
def test_pllm_command_parses_and_names_existing_files(argv):
    from pllm.cli import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`pllm {' '.join(argv)}` does not parse (exit {e.code})")
    config = getattr(args, "config", None)
    if config:
        if "/" in config or config.endswith((".yaml", ".yml")):
            assert (ROOT / config).is_file(), f"--config {config} does not exist"
        else:  # a built-in config by name
            assert (ROOT / "pllm" / "configs" / f"{config}.yaml").is_file(), f"no built-in config {config!r}"


def test_files_named_in_bash_blocks_exist():
    named = set()
    for block in code_blocks(README_TEXT, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for word in shlex.split(line, comments=True):
                if re.fullmatch(r"(scripts/\S+\.sh|pllm/configs/\S+\.ya?ml|\S*serve_config\.yaml|ray_cluster\.yaml)",
                                word):
                    named.add(word)
    assert "serve_config.yaml" in named and any(n.startswith("pllm/configs/") for n in named)
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", [README, RESULTS, RESULTS_LOG], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    links = relative_links(doc.read_text())
    if doc != RESULTS_LOG:
        assert links, f"{doc.name} has no relative links"
    broken = sorted({link for link in links if not (doc.parent / link).exists()})
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_results_commands_use_flags_their_scripts_define():
    """A headline figure's command must still run: each `--flag` appears in the script it calls."""
    commands = re.findall(r"`python (benchmarks/\S+\.py)([^`]*)`", RESULTS.read_text())
    assert commands
    unknown = [(script, flag) for script, rest in commands for flag in re.findall(r"(?<!\S)(--[a-z0-9-]+)", rest)
               if f'"{flag}"' not in (ROOT / script).read_text()]
    assert not unknown, f"RESULTS.md commands use flags their scripts do not define: {unknown}"


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",")
            for p in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def cited_result_patterns(text: str) -> set[str]:
    """Every `results/...` path the text names, braces expanded (`x.{json,md}`), globs kept."""
    patterns = set()
    for token in re.findall(r"(?:benchmarks/)?results/[A-Za-z0-9_.{},*\-]+", text):
        token = token.rstrip(".,").removeprefix("benchmarks/")
        patterns.update(_expand_braces(token))
    return patterns


def test_result_files_are_exactly_the_cited_ones():
    cited = cited_result_patterns(RESULTS.read_text()) | cited_result_patterns(RESULTS_LOG.read_text())
    assert cited
    matched, missing = set(), []
    for pattern in sorted(cited):
        hits = glob.glob(str(RESULTS_DIR.parent / pattern))
        if not hits:
            missing.append(pattern)
        matched.update(Path(h).resolve() for h in hits)
    assert not missing, f"cited result files that do not exist: {missing}"
    # Tracked files only: a local benchmark run may leave untracked output here.
    try:
        tracked = subprocess.run(["git", "ls-files", "-z", "benchmarks/results"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    present = {(ROOT / f).resolve() for f in tracked if f}
    assert present, "no tracked result files"
    uncited = sorted(p.name for p in present - matched)
    assert not uncited, f"result files no results page cites: {uncited}"


@pytest.mark.parametrize("block", [b for b in code_blocks(README_TEXT, "yaml") if b.startswith("task:")])
def test_job_config_blocks_validate(block):
    """The README's job-config examples are configs the job accepts (paths are not checked here)."""
    import yaml

    from pllm.config import JobConfig

    job = JobConfig.from_dict(yaml.safe_load(block))
    assert job.task in ("sft", "adapt") and job.model.init_from
