"""Helpers of the peer benchmark (bench/run.py)."""
