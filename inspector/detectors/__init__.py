"""Anomaly detectors behind one protocol (see base.py)."""
