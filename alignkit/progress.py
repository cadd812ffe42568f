"""Progress bars: tqdm on a terminal; in a log file (not a TTY), a plain line every few seconds.

tqdm redraws a terminal line with carriage returns many times a second. Redirected to a
file, every redraw stays: the quick demo's log was 60 KB of them. Off a terminal the bar
writes a whole line at most every `LOG_INTERVAL` seconds instead.
"""

from __future__ import annotations

import sys
import weakref

LOG_INTERVAL = 10.0  # seconds between progress lines in a non-TTY log


class _Lines:
    """A stream for tqdm that turns each redraw into one line."""

    def __init__(self, stream):
        self.stream, self.last = stream, ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text and text != self.last:  # closing redraws the last line unchanged
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`, as lines every LOG_INTERVAL seconds when stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs = {"file": _Lines(sys.stderr), "mininterval": LOG_INTERVAL, "maxinterval": LOG_INTERVAL * 6,
                  "ncols": 100, **kwargs}
        kwargs.pop("dynamic_ncols", None)
    bar = tqdm(iterable, **kwargs)
    _open.add(bar)
    return bar


_open: weakref.WeakSet = weakref.WeakSet()


def close_all() -> None:
    """Close the bars a failed run left open, so an error printed next starts on its own line
    (and a bar's last redraw does not land after it)."""
    for bar in list(_open):
        bar.close()
    _open.clear()
