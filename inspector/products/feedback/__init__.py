"""Operator feedback as evidence: the records (evidence) and the kept images (images)."""
