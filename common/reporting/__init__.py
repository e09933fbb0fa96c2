"""Reporting tools a user runs (not imported by algorithm files).

    python -m common.reporting.bench      # gradient updates/s per algorithm against the FLOP floor
    python -m common.reporting.results    # score tables, curves and aggregates from run directories
    python -m common.reporting.sweep      # algorithms x datasets x seeds on Ray Tune, resumable
"""
