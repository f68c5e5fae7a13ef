"""Diagnostics of trained models (docs/MESH_METHOD.md section 6): metrics.py holds the math,
states.py reads a model's states, probe.py runs the probe, plots.py draws it."""
