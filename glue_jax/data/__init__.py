"""Datasets, preprocessing and Grain pipelines."""
