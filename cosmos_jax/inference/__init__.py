"""Multiview inference: the reference's spec format (spec.py) and the generation pipeline (pipeline.py)."""
