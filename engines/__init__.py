"""The HUST-19 compute: pre-processing and lung extraction, the slice / patient CNNs and the CF
network behind inference backends, PLR fusion, training and evaluation. No network or bus
code: engines take arrays and files and return arrays and reports."""

from pathlib import Path

MODELS_DIR = Path(__file__).with_name("models")
"""Shipped weights (ONNX, JSON) and their checksums."""
