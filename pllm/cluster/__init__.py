"""Cluster and job tooling (installed as `pllm.cluster`)."""
