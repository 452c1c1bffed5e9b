"""Federated instruction tuning: client training, server loop, server optimisers, checkpoints."""
