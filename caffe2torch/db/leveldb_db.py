"""Caffe2's "leveldb" databases through the ``plyvel`` package: the path is a folder.

The cursor follows LevelDB's bytewise key order; a transaction is a write batch written on
``commit`` (Caffe2's LevelDBTransaction). Mode "new" builds the database in a temporary folder
beside the target and renames it on close, as the other types do; "write" opens (or creates)
the folder in place; "read" needs an existing database. LevelDB allows one open handle per
folder and process, so read-only opens of one folder share a handle, reference-counted.
"""
import os
import shutil
import threading

import plyvel

from caffe2torch.db.base import DB, Cursor, temp_path_beside

_shared = {}  # path -> [plyvel.DB, count]
_shared_lock = threading.Lock()


def _acquire(path):
    with _shared_lock:
        entry = _shared.get(path)
        if entry is None:
            entry = _shared[path] = [plyvel.DB(path, create_if_missing=False), 0]
        entry[1] += 1
        return entry[0]


def _release(path):
    with _shared_lock:
        entry = _shared[path]
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _shared[path]


class LevelDBCursor(Cursor):
    """Forward iteration over a snapshot of the database, first key first."""

    def __init__(self, db):
        self._db = db
        self._snapshot = db.snapshot()
        self._it = None
        self._item = None
        self.seek_to_first()

    def seek_to_first(self):
        """Go back to the first key."""
        if self._it is not None:
            self._it.close()
        self._it = self._snapshot.iterator()
        self.next()

    def next(self):
        """Go to the next key."""
        self._item = next(self._it, None)

    def valid(self):
        """True while the cursor points at a record."""
        return self._item is not None

    def key(self):
        """The current key (bytes)."""
        return self._item[0]

    def value(self):
        """The current value (bytes)."""
        return self._item[1]

    def close(self):
        """Release the iterator and the snapshot."""
        if self._it is not None:
            self._it.close()
            self._it = None
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None


class LevelDBTransaction:
    """Puts collect in a write batch; ``commit`` writes it."""

    def __init__(self, db):
        self._db = db
        self._batch = None

    def put(self, key, value):
        """Store one record (an existing key is overwritten, as in LevelDB)."""
        if self._batch is None:
            self._batch = self._db.write_batch()
        key = key.encode() if isinstance(key, str) else key
        value = value.encode() if isinstance(value, str) else value
        self._batch.put(key, value)

    def commit(self):
        """Write the records put since the last commit."""
        if self._batch is not None:
            self._batch.write()
            self._batch = None

    def abort(self):
        """Drop the records put since the last commit."""
        self._batch = None


class LevelDB(DB):
    """A LevelDB folder opened in mode "new", "write" or "read"."""

    def __init__(self, path, mode):
        self.path = os.fspath(path)
        self.mode = mode
        self._tmp = None
        self._transactions = []
        self._cursors = []
        if mode == "read":
            if not os.path.isfile(os.path.join(self.path, "CURRENT")):
                raise FileNotFoundError(f"leveldb {self.path!r} is not a LevelDB folder "
                                        "(no CURRENT file inside)")
            self._db = _acquire(self.path)
        elif mode == "new":
            if os.path.exists(self.path) and not os.path.isfile(
                    os.path.join(self.path, "CURRENT")):
                raise FileExistsError(f"leveldb {self.path!r} exists and is not a LevelDB "
                                      "folder: remove it or choose another path")
            self._tmp = temp_path_beside(self.path)
            self._db = plyvel.DB(self._tmp, create_if_missing=True, error_if_exists=True)
        elif mode == "write":
            self._db = plyvel.DB(self.path, create_if_missing=True)
        else:
            raise ValueError(f"unknown db mode {mode!r}: use 'new', 'write' or 'read'")

    def cursor(self):
        """A new cursor at the first key."""
        cursor = LevelDBCursor(self._db)
        self._cursors.append(cursor)
        return cursor

    def new_transaction(self):
        """A write batch (new/write mode)."""
        if self.mode == "read":
            raise ValueError(f"leveldb {self.path!r} is open for reading, not writing")
        txn = LevelDBTransaction(self._db)
        self._transactions.append(txn)
        return txn

    def _close_handle(self):
        for cursor in self._cursors:
            cursor.close()
        self._cursors = []
        if self.mode == "read":
            _release(self.path)
        else:
            self._db.close()
        self._db = None

    def close(self):
        """Write pending batches (Caffe2's transaction destructor commits) and close."""
        if self._db is None:
            return
        for txn in self._transactions:
            txn.commit()
        self._close_handle()
        if self._tmp is not None:
            if os.path.exists(self.path):
                shutil.rmtree(self.path)  # an older LevelDB folder: "new" replaces it
            os.replace(self._tmp, self.path)
            self._tmp = None

    def abort(self):
        """Drop unwritten batches; a "new" database leaves no folder behind."""
        if self._db is None:
            return
        for txn in self._transactions:
            txn.abort()
        self._close_handle()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
