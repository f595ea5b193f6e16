"""Benchmarks: sippet-listener side by side with the raw limit and its Python peers.

Run ``python -m bench`` (``--quick``, ``--smoke``); see ``bench/README.md``.
"""
