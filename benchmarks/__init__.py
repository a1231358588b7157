"""Performance benchmarks of modeling_segcompass against the reference-style data flow.

Run them all with `make bench` (or `python benchmarks/run_all.py`); see docs/performance.md.
"""
