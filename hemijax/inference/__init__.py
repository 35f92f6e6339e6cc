"""Whole-volume inference: sliding windows, every subset from shared encodings, the predictor, NIfTI in/out."""
