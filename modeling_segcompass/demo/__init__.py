"""Demo: the embedded default run end to end (what `make demo` runs).

`run` holds the stages and `run_demo`; `summary` the `DemoSummary` and its files; `schedule`
the wall-clock trainer callbacks; `reload` the fresh-process reload of the exported folder.
`run_demo` and `DemoSummary` are re-exported here.
"""

from .run import run_demo
from .summary import DemoSummary

__all__ = ["DemoSummary", "run_demo"]
