"""A progress bar for long trainer steps (first-model training): tqdm, which the stack already ships."""
from __future__ import annotations

import sys
from typing import Callable


def progress_bar(label: str, unit: str = "epoch") -> Callable[[int, int], None]:
    """A callback update(done, total) drawing a bar on stderr; it closes the bar at done >= total."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
