"""The training jobs: on Ray (Ray Data, Ray Train, MLflow) and in one process, sharing their stages."""
