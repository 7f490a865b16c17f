"""Evaluation: scoring pairs for base and adapter, coherence checks, statistics."""
