"""Similarity math (pure numpy) and its distributed execution on Ray."""
