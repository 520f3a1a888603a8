"""Progress for long steps: a tqdm bar on a terminal, plain periodic lines in a log.

A notebook run by papermill or a Kubernetes pod writes to a log, where a redrawn bar turns into
hundreds of lines; there we print one line every ``step_percent`` percent instead.
"""
import sys
import time

from tqdm import tqdm


def progress(desc, total=None, unit="B", enabled=True, file=None, step_percent=10):
    """A reporter with ``update(n)``, ``n`` and ``close()``: tqdm on a TTY, else plain lines.

    With ``file=None`` the bar goes to stderr when that is a terminal, else the lines to stdout
    (where a notebook shows them as ordinary output).
    """
    if not enabled:
        return _Silent()
    if file is None:
        file = sys.stderr if _isatty(sys.stderr) else sys.stdout
    if _isatty(file):
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=file)
    return LineProgress(desc, total, unit, file, step_percent)


def _isatty(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


class LineProgress:
    """Plain lines such as ``downloading train-images: 40% (3.9 MB of 9.9 MB)``."""

    def __init__(self, desc, total, unit, file, step_percent=10, every_s=10.0):
        self.desc, self.total, self.unit, self.file = desc, total, unit, file
        self.step = step_percent
        self.every_s = every_s  # when the total is unknown: a line this often
        self.n = 0
        self._next_percent = step_percent
        self._last_line = time.monotonic()

    def update(self, n=1):
        """Add ``n`` units done; print a line when the next step is crossed."""
        self.n += n
        if self.total:
            percent = 100 * self.n // self.total
            if percent >= self._next_percent and self.n < self.total:
                self._line(f"{percent}% ({self._amount(self.n, unit=False)} of "
                           f"{self._amount(self.total)})")
                self._next_percent = (percent // self.step + 1) * self.step
        elif time.monotonic() - self._last_line >= self.every_s:
            self._line(self._amount(self.n))

    def close(self):
        """Print the final line, unless the step stopped short (its error says why)."""
        if not self.total or self.n >= self.total:
            self._line(f"done ({self._amount(self.n)})")

    def _line(self, text):
        print(f"{self.desc}: {text}", file=self.file, flush=True)
        self._last_line = time.monotonic()

    def _amount(self, n, unit=True):
        if self.unit == "B":
            return f"{n / 1e6:.1f} MB"
        return f"{n:,} {self.unit}" if unit else f"{n:,}"


class _Silent:
    """progress(enabled=False): report nothing."""

    n = 0

    def update(self, n=1):
        """Count, print nothing."""
        self.n += n

    def close(self):
        """Nothing to finish."""
