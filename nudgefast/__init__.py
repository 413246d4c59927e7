"""nudgefast: NUDGE fine-tuning of data embeddings (arXiv 2409.02343) at hardware speed.

Public API: :class:`NudgeM`, :class:`NudgeN` (``fit -> NudgeResult``), :class:`QuerySet`,
:func:`search`, :func:`metrics`, :func:`backends`; :class:`Tuner` (a fit kept for
feedback, returning :class:`Delta` hand-offs); :func:`quantize` (Sentence-Transformers'
int8/uint8/binary codes: a :class:`QuantizedCorpus` with its :class:`QuantizationRanges`);
:class:`Corrector` (old-model embeddings mapped to a new model's, applied inside the passes)
and :func:`choose_sample` (which records to re-embed). The
drop-in for ``nudge-ft`` lives in :mod:`nudgefast.compat`.
"""
from __future__ import annotations

import logging

from ._backends import backends
from .metrics import metrics
from .nudge import NudgeM, NudgeN, NudgeResult
from .queryset import QuerySet
from .search import SearchResult, search
from .handoff import Delta
from .tuner import Tuner
from .quantize import QuantizationRanges, QuantizedCorpus, quantize
from .corrector import Corrector, choose_sample

__version__ = "0.1.0"
__all__ = ["NudgeM", "NudgeN", "NudgeResult", "QuerySet", "SearchResult", "search", "metrics",
           "backends", "Tuner", "Delta", "quantize", "QuantizedCorpus", "QuantizationRanges",
           "Corrector", "choose_sample"]

logging.getLogger("nudgefast").addHandler(logging.NullHandler())
