"""Experiment configs: `get_config()` in each file; see configs/base.py."""
