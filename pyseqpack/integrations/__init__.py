"""Integrations with training frameworks (transformers, TRL, accelerate)."""
