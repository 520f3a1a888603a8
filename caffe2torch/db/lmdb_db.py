"""Caffe2's "lmdb" databases through the ``lmdb`` package: the path is a folder.

Read mode opens an existing folder read-only without a lock file, like Caffe2's
MDB_RDONLY|MDB_NOLOCK with a 1 TB map; the cursor follows LMDB's lexicographic key order.
Mode "new" builds the database in a temporary folder beside the target and renames it on close.
"""
import os
import shutil
import threading

import lmdb

from caffe2torch.db.base import DB, Cursor, temp_path_beside

MAP_SIZE = 1 << 40  # Caffe2's LMDB_MAP_SIZE: address space only, the file grows as needed

# py-lmdb allows one Environment per folder and process, but Caffe2 code opens the same database
# several times (a training DBReader, a test reader, a tool that scans it): read-only opens share
# one Environment, reference-counted, each with its own read transaction.
_shared = {}
_shared_lock = threading.Lock()


def _acquire_readonly(path):
    key = os.path.realpath(path)
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            env = _open_existing(path, readonly=True, lock=False, create=False)
            try:
                check_complete(env, path)
            except ValueError:
                env.close()
                raise
            entry = _shared[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def check_complete(env, path):
    """Raise ValueError when data.mdb is shorter than the pages its meta page says it has.

    LMDB maps the file and trusts it: reading a page past the end of a cut-off file kills the
    process with SIGBUS, which no ``except`` catches. The meta page (at the file's start) names the
    last page in use, so the size the file must have is known before any data page is touched.
    """
    data = os.path.join(path, "data.mdb")
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(data)
    if have < need:
        raise ValueError(f"lmdb {data!r} is damaged: the file has {have} bytes but its pages need "
                         f"{need} (cut short by a full disk or an unfinished copy?); rebuild or "
                         "copy the database again")


def _open_existing(path, **kwargs):
    """lmdb.open on an existing folder, with LMDB's own refusals turned into one clear line."""
    try:
        return lmdb.open(path, map_size=MAP_SIZE, subdir=True, **kwargs)
    except lmdb.Error as e:
        raise ValueError(f"lmdb {os.path.join(path, 'data.mdb')!r} cannot be opened ({e}); "
                         "rebuild or copy the database again") from None


def _release_readonly(path):
    key = os.path.realpath(path)
    with _shared_lock:
        entry = _shared.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _shared[key]
            entry[0].close()


class LMDBCursor(Cursor):
    """A cursor over one read transaction (Caffe2's LMDBCursor)."""

    def __init__(self, env):
        self._txn = env.begin(buffers=False)
        self._cursor = self._txn.cursor()
        self._valid = False
        self.seek_to_first()

    def seek_to_first(self):
        """Move to the first key."""
        self._valid = self._cursor.first()

    def next(self):
        """Move to the next key; ``valid()`` turns False after the last one."""
        self._valid = self._cursor.next()

    def valid(self):
        """True while the cursor points at a record."""
        return self._valid

    def key(self):
        """The current key (bytes)."""
        return self._cursor.key() if self._valid else None

    def value(self):
        """The current value (bytes)."""
        return self._cursor.value() if self._valid else None

    def take(self, n):
        """Up to ``n`` (key, value) from the current record on, advancing past them: two lmdb
        calls a record (a batch of 64 reads in a third of the time of the generic loop)."""
        records, cursor, valid = [], self._cursor, self._valid
        while valid and len(records) < n:
            records.append(cursor.item())
            valid = cursor.next()
        self._valid = valid
        return records

    def close(self):
        """End the read transaction."""
        self._txn.abort()


class LMDBTransaction:
    """Puts go into one write transaction; ``commit`` makes them durable and starts another."""

    def __init__(self, db):
        self._db = db
        self._txn = None

    def put(self, key, value):
        """Store one record (an existing key is overwritten, as in LMDB)."""
        if self._txn is None:
            self._txn = self._db._env.begin(write=True)
        key = key.encode() if isinstance(key, str) else key
        self._txn.put(key, value)

    def commit(self):
        """Commit the records put since the last commit."""
        if self._txn is not None:
            self._txn.commit()
            self._txn = None

    def abort(self):
        """Drop the records put since the last commit."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None


class LMDB(DB):
    """An LMDB folder opened in mode "new", "write" or "read"."""

    def __init__(self, path, mode):
        self.path = os.fspath(path)
        self.mode = mode
        self._tmp = None
        self._transactions = []
        if mode == "read":
            if not os.path.isfile(os.path.join(self.path, "data.mdb")):
                raise FileNotFoundError(f"lmdb {self.path!r} is not an LMDB folder "
                                        "(no data.mdb inside)")
            self._env = _acquire_readonly(self.path)
        elif mode == "new":
            if os.path.exists(self.path) and not os.path.isfile(
                    os.path.join(self.path, "data.mdb")):
                raise FileExistsError(f"lmdb {self.path!r} exists and is not an LMDB folder: "
                                      "remove it or choose another path")
            self._tmp = temp_path_beside(self.path)
            self._env = lmdb.open(self._tmp, map_size=MAP_SIZE, subdir=True)
        elif mode == "write":
            existing = os.path.isfile(os.path.join(self.path, "data.mdb"))
            self._env = lmdb.open(self.path, map_size=MAP_SIZE, subdir=True)
            if existing:
                try:
                    check_complete(self._env, self.path)
                except ValueError:
                    self._env.close()
                    raise
        else:
            raise ValueError(f"unknown db mode {mode!r}: use 'new', 'write' or 'read'")

    def cursor(self):
        """A new cursor at the first key."""
        return LMDBCursor(self._env)

    def new_transaction(self):
        """A write transaction (new/write mode)."""
        if self.mode == "read":
            raise ValueError(f"lmdb {self.path!r} is open for reading, not writing")
        txn = LMDBTransaction(self)
        self._transactions.append(txn)
        return txn

    def close(self):
        """Commit pending records (Caffe2's transaction destructor does) and close."""
        if self._env is None:
            return
        for txn in self._transactions:
            txn.commit()
        self._close_env()
        if self._tmp is not None:
            if os.path.exists(self.path):
                shutil.rmtree(self.path)  # an older LMDB folder: "new" replaces it
            os.replace(self._tmp, self.path)
            self._tmp = None

    def abort(self):
        """Drop uncommitted records; a "new" database leaves no folder behind."""
        if self._env is None:
            return
        for txn in self._transactions:
            txn.abort()
        self._close_env()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _close_env(self):
        if self.mode == "read":
            _release_readonly(self.path)
        else:
            self._env.close()
        self._env = None
