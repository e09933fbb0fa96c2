"""Numerical cross-check: one update of an algorithm file against its reference implementation.

    python -m common.reporting.crosscheck --reference /path/to/CORL --algos td3_bc iql cql awac bc dt
    python -m common.reporting.crosscheck --reference /path/to/CORL --jax-python /path/to/jax-venv/bin/python \
        --d3rlpy-python /path/to/d3rlpy-venv/bin/python                                  # every comparison

For each file the library's agent is built from its own Config and its weights are copied into the reference's
networks (target networks perturbed first, so that a mix-up of a network and its target shows); both take one
update on the same random batch with the same random draws (torch reseeded alike, or the same pre-drawn noise
handed to both where they draw in different shapes); the max abs difference of the losses and of every parameter
goes to results/crosscheck.md, one row per file. References are run from where they live (a checkout, or an
installed package in its own interpreter), never copied into the repository:

    corl.py         CORL's PyTorch files (TD3+BC, IQL, CQL, AWAC, BC, DT, SAC-N, EDAC, LB-SAC, Cal-QL, SPOT),
                    imported from the checkout in this process, their training-only imports stubbed
    corl_jax.py     CORL's ReBRAC (JAX), run by `jax_side.py` in a Python with jax, flax and optax
    d3rlpy_crr.py   d3rlpy's CRR, run by `d3rlpy_side.py` in a Python with d3rlpy
    matching.py     weights as pairs of tensors, batches, reseeding, differences
    reference.py    finding, identifying (commit) and importing a reference's file (standard library only)
    table.py        the results table, a row per file, replaced on rerun

The side modules run in interpreters without the library's dependencies: this package's __init__ (this file)
imports nothing.
"""
