"""Experiment configs (``get_config(arg)`` files with a ``:smoke`` variant)."""
