"""``adacache bench``: speed and fidelity of caching policies against full computation and
against the cache systems people use today, on the same weights, in the same process."""
