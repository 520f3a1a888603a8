"""Caffe2's MiniDB: a plain sequence of records ``int32 key_len, int32 value_len, key, value``.

No header, footer or index; little-endian lengths (every real file is); duplicate keys are kept
in write order. Mode "new" writes to a temporary file beside the target and renames it on close,
so an error never leaves a half-written database behind; "write" appends like Caffe2's "ab".
"""
import os
import struct

from caffe2torch.db.base import DB, Cursor, temp_path_beside

_LENGTHS = struct.Struct("<ii")


class MiniDBCursor(Cursor):
    """A forward-only cursor over a MiniDB file (Caffe2's MiniDBCursor)."""

    def __init__(self, path):
        self._path = path
        self._file = open(path, "rb")
        self._key = self._value = None
        try:
            self.seek_to_first()
        except ValueError:
            self._file.close()
            raise

    def seek_to_first(self):
        """Rewind to the first record."""
        self._file.seek(0)
        self.next()

    def next(self):
        """Move to the next record; ``valid()`` turns False at the end of the file."""
        head = self._file.read(_LENGTHS.size)
        if not head:
            self._key = self._value = None
            return
        offset = self._file.tell() - len(head)
        if len(head) < _LENGTHS.size:
            self._corrupt(offset, "the file ends inside a record header")
        key_len, value_len = _LENGTHS.unpack(head)
        if key_len <= 0 or value_len <= 0:
            self._corrupt(offset, f"record lengths must be > 0, got key {key_len}, "
                                  f"value {value_len}")
        key = self._file.read(key_len)
        value = self._file.read(value_len)
        if len(key) < key_len or len(value) < value_len:
            self._corrupt(offset, f"the file ends inside a record of {key_len}+{value_len} bytes")
        self._key, self._value = key, value

    def _corrupt(self, offset, why):
        self._key = self._value = None
        raise ValueError(f"corrupt or truncated minidb {self._path!r} at byte {offset}: {why}")

    def valid(self):
        """True while the cursor points at a record."""
        return self._key is not None

    def key(self):
        """The current record's key (bytes)."""
        return self._key

    def value(self):
        """The current record's value (bytes)."""
        return self._value

    def close(self):
        """Close the file."""
        self._file.close()


class MiniDBTransaction:
    """Writes records straight to the open file (Caffe2's MiniDBTransaction)."""

    def __init__(self, db):
        self._db = db

    def put(self, key, value):
        """Append one record."""
        self._db._write(key, value)

    def commit(self):
        """Flush what was written."""
        self._db._file.flush()


class MiniDB(DB):
    """A MiniDB opened in mode "new", "write" or "read"."""

    def __init__(self, path, mode):
        self.path = os.fspath(path)
        self.mode = mode
        self._file = None
        self._tmp = None
        self._cursors = []
        if mode == "read":
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"minidb {self.path!r} does not exist")
        elif mode == "new":
            if os.path.isdir(self.path):
                raise IsADirectoryError(f"minidb {self.path!r} is a folder: a minidb is one "
                                        "file, choose another path")
            self._tmp = temp_path_beside(self.path)
            self._file = open(self._tmp, "xb")
        elif mode == "write":
            self._file = open(self.path, "ab")
        else:
            raise ValueError(f"unknown db mode {mode!r}: use 'new', 'write' or 'read'")

    def cursor(self):
        """A new cursor at the first record (read mode)."""
        if self.mode != "read":
            raise ValueError(f"minidb {self.path!r} is open for writing, not reading")
        cursor = MiniDBCursor(self.path)
        self._cursors.append(cursor)
        return cursor

    def new_transaction(self):
        """A transaction that appends records (new/write mode)."""
        if self._file is None:
            raise ValueError(f"minidb {self.path!r} is not open for writing")
        return MiniDBTransaction(self)

    def _write(self, key, value):
        key, value = _as_bytes(key), _as_bytes(value)
        if not key or not value:
            raise ValueError(f"minidb {self.path!r}: keys and values must not be empty "
                             "(Caffe2's reader rejects zero lengths)")
        self._file.write(_LENGTHS.pack(len(key), len(value)))
        self._file.write(key)
        self._file.write(value)

    def _release(self):
        """Close the cursors and the file; True when the file was still open."""
        for cursor in self._cursors:
            cursor.close()
        self._cursors = []
        was_open = self._file is not None
        if was_open:
            self._file.close()
            self._file = None
        return was_open

    def close(self):
        """Close the cursors; finish writing: a new database replaces the target only now."""
        if self._release() and self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            try:
                os.replace(tmp, self.path)
            except OSError:
                os.unlink(tmp)
                raise

    def abort(self):
        """Drop what a "new" database wrote; the target is left untouched."""
        self._release()
        if self._tmp is not None:
            os.unlink(self._tmp)
            self._tmp = None


def _as_bytes(x):
    return x.encode() if isinstance(x, str) else bytes(x)
