"""Ray Data and Ray Train jobs."""
