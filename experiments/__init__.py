"""Experiments built on the model package (not installed with it, and never imported by the service)."""
