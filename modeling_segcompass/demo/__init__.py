"""Demo: the embedded default run end to end (what `make demo` runs).

`run` holds the stages; `run_demo` and `DemoSummary` are re-exported here.
"""

from .run import DemoSummary, run_demo

__all__ = ["DemoSummary", "run_demo"]
