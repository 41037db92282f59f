"""What tests and benchmarks share: the decoder conformance tests and the tiny-model builders.

- :mod:`brainrecon.testing.conformance` — :class:`DecoderConformance`, the tests every decoder
  gets, built-in or plugin (needs pytest, the ``test`` extra)::

      from brainrecon.testing import DecoderConformance

- :mod:`brainrecon.testing.tiny` — models with random weights built from config (tiny ones for
  tests, full-size ones for benchmarks), saved in the layouts of the real weight files. Needs
  torch, diffusers and transformers, not pytest. Never real weights.

``DecoderConformance`` is imported on first use, so that importing the tiny builders does not
need pytest.
"""

from __future__ import annotations

from brainrecon.extras import lazy_exports

__getattr__ = lazy_exports(__name__, {"DecoderConformance": "brainrecon.testing.conformance"})

__all__ = ["DecoderConformance"]
