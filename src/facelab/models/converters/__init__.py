"""Readers for foreign weight formats; each produces an ordinary PyTorch state dict or module."""
