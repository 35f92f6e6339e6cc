"""Evaluation: metrics, subsets, tables and statistics, plots, and evaluating a trained workdir."""
