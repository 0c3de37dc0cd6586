"""Integrations with training frameworks (imported lazily: they need transformers)."""
