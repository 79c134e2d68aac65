"""N-gram prompt lookup: propose the tokens that followed the latest earlier copy of the suffix.

No model: the sequence's own tokens (prompt and output) are the draft. For n from `max_n` down to
`min_n`, find the latest position where the last n tokens occurred before, and propose the (up to) k
tokens that followed that occurrence:

    tokens:   ... a b c d e ... x a b c  |   suffix "a b c" (n = 3) occurred at positions 1..3
    proposal:       d e ...              |   the k tokens after it

Code and structured text repeat themselves (identifiers, boilerplate, copied spans of the prompt),
which is where this wins; on free text it rarely matches and then proposes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_MAX_N = 4
DEFAULT_MIN_N = 2


def propose_ngram(token_ids: Sequence[int], k: int, max_n: int = DEFAULT_MAX_N,
                  min_n: int = DEFAULT_MIN_N) -> list[int]:
    """Up to `k` draft tokens for `token_ids` (possibly fewer, [] when no n-gram matches).

    The longest n wins; among equal n, the latest occurrence. The match may overlap the suffix itself
    (a repeating pattern proposes its own continuation). Raises ValueError unless 1 <= min_n <= max_n.
    """
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    length = len(token_ids)
    if k < 1 or length < min_n + 1:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)  # (L,)
    # end positions e (< L - 1) of earlier occurrences of the last token; the match is arr[e-n+1 .. e]
    ends = np.flatnonzero(arr[:-1] == arr[-1])  # (M,) ascending
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        cand = ends[ends >= n - 1]
        if cand.size == 0:
            continue
        ok = np.ones(cand.size, dtype=bool)
        for j in range(1, n):  # compare the j-th token before the end
            ok &= arr[cand - j] == arr[length - 1 - j]
        hits = cand[ok]
        if hits.size:
            start = int(hits[-1]) + 1
            return arr[start : start + k].tolist()
    return []
