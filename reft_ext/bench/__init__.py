"""Benchmark suite: fused ops vs the naive PyTorch composite, with a copy_ roofline, on one device.

Run ``python -m reft_ext.bench [--quick]``; the pytest-benchmark files in ``bench/`` use the same
cases (:mod:`reft_ext.bench.cases`).
"""
