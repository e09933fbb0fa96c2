"""Thin shared layer of the library: datasets, evaluation, logging, checkpoints, seeding.

Nothing algorithm-specific lives here: every algorithm is one standalone file in `algorithms/`.
"""
