"""Torpor's benchmarks: ``torpor bench`` (``bench.cli``) and the scripts beside it.

A package of its own, outside ``host``, because it sits above everything it
measures: it may import any room of the host, ``policies`` and ``snapshots``, and
nothing but the CLI imports it (lazily, for ``torpor bench``).
"""
