"""`pllm cluster start|submit|status|stop`: a local Ray head plus an MLflow tracking server."""

from __future__ import annotations

import argparse


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """Register the `pllm cluster` command group on the top-level parser's subcommands."""
    sub.add_parser("cluster", help="start, use and stop a Ray head with an MLflow tracking server")
