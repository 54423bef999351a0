"""Overlap passes (placeholder while being written)."""
from __future__ import annotations


def overlap_passes(names) -> list:
    return []
