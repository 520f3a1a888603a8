"""What every database type shares: cursor iteration, the context manager, temporary names."""
import os
import secrets


class Cursor:
    """Iteration over (key, value) from the current record, through the subclass's
    ``valid``, ``key``, ``value`` and ``next``."""

    def __iter__(self):
        """Yield (key, value) from the current record to the end."""
        while self.valid():
            yield self.key(), self.value()
            self.next()

    def take(self, n):
        """Up to ``n`` (key, value) from the current record on (fewer at the end), advancing
        past them."""
        records = []
        while len(records) < n and self.valid():
            records.append((self.key(), self.value()))
            self.next()
        return records


class DB:
    """A database is a context manager: ``close`` on success, ``abort`` on an exception (so a
    "new" database being built is never left half-written)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def temp_path_beside(path):
    """A fresh name in the folder of ``path``, so that os.replace onto ``path`` is atomic."""
    return f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
