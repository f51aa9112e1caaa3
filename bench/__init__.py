"""Benchmarks of the broker against its simulator and a LiteLLM proxy; see bench/run.py."""
