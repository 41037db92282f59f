"""Kept for the tests' imports: the conformance tests live in :mod:`brainrecon.testing`."""

from brainrecon.testing import DecoderConformance

__all__ = ["DecoderConformance"]
