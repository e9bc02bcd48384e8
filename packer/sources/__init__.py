"""Turning a dataset folder into a stream of candidates (see base.py)."""
