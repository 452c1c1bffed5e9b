"""Evaluation: generation, safety judges, helpfulness, statistics."""
