"""Caffe2 databases behind one small interface: ``open_db(db_type, path, mode)``.

A DB has ``cursor()`` (``seek_to_first``, ``next``, ``key``, ``value``, ``valid``, and iteration
over (key, value) bytes pairs), ``new_transaction()`` (``put``, ``commit``) and ``close()``, and is
a context manager. Example::

    with open_db("minidb", "data.minidb", "new") as db:
        txn = db.new_transaction()
        txn.put(b"00000000", value_bytes)
        txn.commit()
    with open_db("minidb", "data.minidb", "read") as db:
        for key, value in db.cursor():
            ...
"""
import os
import threading

from caffe2torch.db.lmdb_db import LMDB
from caffe2torch.db.minidb import MiniDB


def _leveldb(path, mode):
    # plyvel (LevelDB) loads only when a leveldb database is opened.
    from caffe2torch.db.leveldb_db import LevelDB
    return LevelDB(path, mode)


# Caffe2 registered both spellings of each type.
_DB_CLASSES = {"minidb": MiniDB, "MiniDB": MiniDB, "lmdb": LMDB, "LMDB": LMDB,
               "leveldb": _leveldb, "LevelDB": _leveldb}
SUPPORTED_DB_TYPES = ("minidb", "lmdb", "leveldb")
MODES = ("new", "write", "read")  # Caffe2's NEW, WRITE, READ


def open_db(db_type: str, path: str | os.PathLike, mode: str) -> MiniDB | LMDB:
    """Open the database ``path`` of type ``db_type`` in mode "new", "write" or "read"."""
    try:
        cls = _DB_CLASSES[db_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"db_type {db_type!r} is not supported by caffe2torch: use one of "
            f"{', '.join(SUPPORTED_DB_TYPES)} (or MiniDB, LMDB)") from None
    if mode not in MODES:
        raise ValueError(f"unknown db mode {mode!r}: use one of {', '.join(MODES)}")
    return cls(path, mode)


class DBReader:
    """Caffe2's DBReader blob: an open database and a cursor shared by the ops that read it.

    ``read()`` returns the current (key, value) and advances, wrapping to the first record at
    the end. With ``num_shards`` > 1 each read skips to the next record of shard ``shard_id``.
    Thread-safe: TensorProtosDBInput reads from a prefetch thread.
    """

    def __init__(self, db_type: str, path: str | os.PathLike, num_shards: int = 1,
                 shard_id: int = 0) -> None:
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"DBReader {path!r}: need num_shards >= 1 and "
                             f"0 <= shard_id < num_shards, got {num_shards}, {shard_id}")
        self.db_type = db_type
        self.path = path
        self.num_shards = num_shards
        self.shard_id = shard_id
        self.lock = threading.Lock()
        self.db = open_db(db_type, path, "read")
        self.cursor = self.db.cursor()
        self._move_to_beginning()

    def reopen(self, db_type, path, num_shards=1, shard_id=0):
        """Open ``path`` again in this same reader, at its first record (Caffe2's DBReader::Open
        on an existing blob)."""
        with self.lock:
            self.cursor.close()
            self.db.close()
            self.db_type, self.path = db_type, path
            self.num_shards, self.shard_id = num_shards, shard_id
            self.db = open_db(db_type, path, "read")
            self.cursor = self.db.cursor()
            self._move_to_beginning()

    def _move_to_beginning(self):
        self.cursor.seek_to_first()
        for _ in range(self.shard_id):
            self.cursor.next()
            if not self.cursor.valid():
                raise ValueError(f"database {self.path!r} has fewer records than "
                                 f"shard_id {self.shard_id}")

    def read(self) -> tuple[bytes, bytes]:
        """The current (key, value); then advance, wrapping around at the end."""
        with self.lock:
            return self._read_locked()

    def read_many(self, n: int) -> list[tuple[bytes, bytes]]:
        """``n`` consecutive records as a list of (key, value), read under one lock."""
        with self.lock:
            if self.num_shards != 1:
                return [self._read_locked() for _ in range(n)]
            records = []
            while len(records) < n:
                self._at_a_record()
                records += self.cursor.take(n - len(records))
            if not self.cursor.valid():  # as read(): at the end, back to the first record
                self._move_to_beginning()
            return records

    def _at_a_record(self):
        if not self.cursor.valid():  # empty, or a Load read the cursor to the end
            self._move_to_beginning()
            if not self.cursor.valid():
                raise ValueError(f"database {self.path!r} ({self.db_type}) has no records")

    def _read_locked(self):
        self._at_a_record()
        record = self.cursor.key(), self.cursor.value()
        for _ in range(self.num_shards):
            self.cursor.next()
            if not self.cursor.valid():
                self._move_to_beginning()
                break
        return record

    def close(self) -> None:
        """Close the cursor and the database."""
        with self.lock:
            self.cursor.close()
            self.db.close()

    def __del__(self):
        # A DBReader blob dropped from the workspace closes its files, as Caffe2's destructor.
        if getattr(self, "cursor", None) is not None:
            self.close()

    def __repr__(self):
        return f"DBReader(db_type={self.db_type!r}, path={self.path!r})"


__all__ = ["open_db", "DBReader", "MiniDB", "LMDB", "SUPPORTED_DB_TYPES"]
