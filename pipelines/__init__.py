"""Ray Data and Ray Train jobs (installed as `pllm.pipelines`)."""
