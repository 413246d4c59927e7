"""Every default in one place: chunk sizes, blocks, the NUDGE-N gamma grid."""
from __future__ import annotations

import numpy as np

#: Bytes of corpus rows read per chunk, and the cap on a chunk's (n_q x rows) score tile
#: for backends that materialise one (numpy). Keeps the fit's memory flat in N.
CHUNK_BYTES = 64 << 20
MIN_CHUNK_ROWS = 1024
#: Validation queries handled together in the touched-records step (n_b x t matrices).
VAL_BLOCK = 256
#: The reference's NUDGE-N grid {0, 0.02, ..., 0.48}.
NUDGE_N_GAMMAS = np.array([0.02 * i for i in range(25)])
#: The reference's epsilon in NUDGE-M's interval bounds (compat only; the native API is exact).
REFERENCE_EPS = 1e-8


def chunk_rows_for(n_queries: int, d: int, itemsize: int) -> int:
    """Rows per corpus chunk: bounded by CHUNK_BYTES of corpus and of float32 scores."""
    by_corpus = CHUNK_BYTES // max(1, d * itemsize)
    by_scores = CHUNK_BYTES // max(1, 4 * n_queries)
    return max(MIN_CHUNK_ROWS, min(by_corpus, by_scores))
