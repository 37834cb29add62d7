"""Progress bars for the long steps: on stderr, and only when stderr is a terminal.

A log file, a pipe or CI output gets no bar at all, not even a final line: a bar redrawn with
carriage returns is noise there, and the stages print their own summaries. Lightning's epoch
bar follows the same rule (`enable_progress_bar` in `cnnops.train`), as do MLflow's artifact
bars (`cnnops.tracking`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def shown() -> bool:
    """Whether bars are drawn: stderr is a terminal. Per-item log lines are for when they are not."""
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "it", **options: Any) -> tqdm:
    """A tqdm bar on stderr, disabled (silent) unless stderr is a terminal; `unit="B"` counts bytes."""
    from tqdm import tqdm

    if unit == "B":
        options = {"unit_scale": True, "unit_divisor": 1024, **options}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not shown(), **options)
