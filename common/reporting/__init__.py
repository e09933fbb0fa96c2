"""Reporting tools a user runs (not imported by algorithm files).

    python -m common.reporting.bench      # gradient updates/s per algorithm against the FLOP floor
    python -m common.reporting.results    # score tables, curves and aggregates from run directories
    python -m common.reporting.sweep      # algorithms x datasets x seeds on Ray Tune, resumable
    python -m common.reporting.video RUN  # MP4s of a saved run's policy in its evaluation env, without training
    python -m common.reporting.crosscheck # one update of each file against its reference (CORL, d3rlpy)
"""
