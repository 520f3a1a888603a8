"""Database ops: CreateDB, TensorProtosDBInput, Save and Load (Caffe2's db and load_save ops)."""
import itertools
import math
import os

import numpy as np
import torch
from google.protobuf import message

from caffe2torch.db import DBReader, open_db
from caffe2torch.db import serialize
from caffe2torch import limits
from caffe2torch.ops.registry import NO_GRADIENT, register_op
from caffe2torch.proto import caffe2_pb2, records_pb2


@register_op("CreateDB", gradient=NO_GRADIENT, side_effects=True)
def create_db(ctx, inputs):
    """Open database ``db`` of type ``db_type`` (default leveldb, as Caffe2) as a DBReader."""
    # ``db`` is used as given, not relative to the workspace root (Caffe2 does the same).
    args = (ctx.arg("db_type", "leveldb"), ctx.require("db"), ctx.arg("num_shards", 1),
            ctx.arg("shard_id", 0))
    existing = ctx.workspace.blobs.get(ctx.output_names[0])
    if isinstance(existing, DBReader):
        # Caffe2 re-opens the DBReader already in the blob: a TensorProtosDBInput of the same
        # net keeps the batch it prefetched, so a second run gives the second batch.
        existing.reopen(*args)
        return [existing]
    return [DBReader(*args)]


# --- TensorProtosDBInput ------------------------------------------------------------------------

def read_batch(reader, batch_size, num_outputs, cache=None):
    """Read ``batch_size`` records (0: one, unbatched) and decode them into numpy arrays.

    Records laid out byte for byte as the first one, but for their values, are cut as one
    array (see _Template; ``cache`` keeps the template between batches). Otherwise each output's
    values are gathered record by record as the protobuf holds them (byte_data bytes, a
    repeated field) and turned into one array per batch: no numpy call per record.
    """
    records = reader.read_many(max(batch_size, 1))
    lead = (batch_size,) if batch_size else ()
    if cache is not None:
        template = cache.get("template")
        if template is None:
            template = cache["template"] = _Template.of(records[0][1], num_outputs)
        if template:
            columns = template.cut(records)
            if columns is not None:
                return [column.reshape(lead + dims) for column, dims in zip(columns, template.dims)]
    batch = parse_records(reader, records)
    first = batch[0]
    if len(first) != num_outputs:
        raise ValueError(f"record {records[0][0]!r} of {reader.path!r} holds "
                         f"{len(first)} TensorProtos but the op has {num_outputs} outputs")
    layout = [(p.data_type, list(p.dims)) for p in first]
    sizes = [math.prod(dims) for _, dims in layout]
    columns = (_plain_columns(batch, layout, sizes, num_outputs)
               or _checked_columns(reader, records, batch, layout, sizes, num_outputs))
    return [_stack(column, data_type, lead + tuple(dims))
            for column, (data_type, dims) in zip(columns, layout)]


class _Template:
    """The serialized layout of a database's records, to cut a batch's values out of its bytes.

    Built from one record whose TensorProtos hold byte_data (BYTE) or one-byte varints (INT32 or
    INT64 values 0..127, e.g. labels) and that protobuf serializes back to the same bytes. Each
    output's value bytes are found by serializing the record again with that output's values
    changed in every byte (protobuf's own serializer: no wire format code here) and comparing.
    A batch is cut only when every record has the template's length and its bytes outside the
    values (tags, lengths, dims, data types) equal the template's, and every varint byte is a
    whole varint (high bit clear): then each parses as the template with other values, and its
    values are those bytes. Anything else takes protobuf's parse (``read_batch``).

    A batch of 64 MNIST records read and cut in ~55 us instead of ~165 us (``parse_records``,
    then a few attribute reads per record); in LeNet's training iteration, where the kernels in
    between leave the caches cold, 221 instead of 434 us.
    """

    def __init__(self, length, dims, dtypes, spans, fixed, values):
        self.length, self.dims, self.dtypes = length, dims, dtypes
        self.spans = spans  # per output: its value bytes' positions (a slice or an index array)
        # One check over the positions that must hold the template's bytes (``fixed``) and the
        # varint bytes (high bit clear): (byte ^ expected) & mask is zero everywhere.
        varints = [spans[k] for k, d in enumerate(dtypes) if d != np.uint8]
        self.checked = np.concatenate([fixed] + varints)
        self.expected = np.concatenate([values] + [np.zeros(len(v), np.uint8) for v in varints])
        self.mask = np.concatenate([np.full(len(fixed), 0xFF, np.uint8)]
                                   + [np.full(len(v), 0x80, np.uint8) for v in varints])

    @classmethod
    def of(cls, value, num_outputs):
        """The template of record ``value`` (bytes), or False when it has none."""
        try:
            protos = caffe2_pb2.TensorProtos.FromString(value)
        except message.DecodeError:
            return False
        if len(protos.protos) != num_outputs or protos.SerializeToString() != value:
            return False
        base = np.frombuffer(value, np.uint8)
        data = np.zeros(len(value), bool)
        spans, dims, dtypes = [], [], []
        for k, p in enumerate(protos.protos):
            changed = caffe2_pb2.TensorProtos()
            changed.CopyFrom(protos)
            q = changed.protos[k]
            count = math.prod(p.dims)
            plain = not p.data_format and not p.HasField("raw_data")
            if plain and p.data_type == caffe2_pb2.TensorProto.BYTE and len(p.byte_data) == count:
                q.byte_data = bytes(b ^ 0xFF for b in p.byte_data)
            elif (plain and p.data_type in _SMALL_INTS and
                  len(values := getattr(p, _SMALL_INTS[p.data_type])) == count
                  and all(0 <= v < 0x80 for v in values)):
                field = getattr(q, _SMALL_INTS[p.data_type])
                field[:] = [v ^ 0x7F for v in values]
            else:
                return False
            new = changed.SerializeToString()
            if len(new) != len(value):
                return False
            where = np.flatnonzero(np.frombuffer(new, np.uint8) != base)
            if len(where) != count or data[where].any():
                return False
            data[where] = True
            if p.data_type == caffe2_pb2.TensorProto.BYTE:
                if count and where[-1] - where[0] + 1 != count:
                    return False
                spans.append(slice(where[0], where[0] + count) if count else slice(0, 0))
            else:
                spans.append(where)
            dims.append(tuple(p.dims))
            dtypes.append(serialize.numpy_dtype(p.data_type))
        fixed = np.flatnonzero(~data)
        return cls(len(value), dims, dtypes, spans, fixed, base[fixed])

    def cut(self, records):
        """Each output's values for ``records`` as flat arrays, or None when one does not fit."""
        values = [value for _key, value in records]
        if any(len(v) != self.length for v in values):
            return None
        rows = np.frombuffer(b"".join(values), np.uint8).reshape(len(values), self.length)
        checked = rows[:, self.checked]
        np.bitwise_xor(checked, self.expected, out=checked)
        if np.bitwise_and(checked, self.mask, out=checked).any():
            return None
        return [rows[:, span].astype(dtype).reshape(-1)
                for span, dtype in zip(self.spans, self.dtypes)]


# Integer types whose values a template reads as one-byte varints: their repeated field.
_SMALL_INTS = {caffe2_pb2.TensorProto.INT32: "int32_data",
               caffe2_pb2.TensorProto.INT64: "int64_data"}


def parse_records(reader, records):
    """Each record's TensorProtos (a list of its ``protos``), parsed in one call.

    The records go through protobuf as one ``TensorProtosBatch``: one upb arena per batch, not
    one per record. (upb's Python allocator calls ``malloc_trim(0)`` every 10,000 arena frees:
    with an arena per record that is every few dozen training iterations, and each trim hands
    the heap's free pages back to the kernel, to be faulted in again by the next convolutions.)
    A batch that does not parse is parsed record by record to name the bad one.
    """
    wire = bytearray()
    for _key, value in records:
        wire += _field_1_tag
        wire += _varint(len(value))
        wire += value
    try:
        return [r.protos for r in records_pb2.TensorProtosBatch.FromString(bytes(wire)).records]
    except message.DecodeError:
        for key, value in records:
            try:
                caffe2_pb2.TensorProtos.FromString(value)
            except message.DecodeError:
                raise ValueError(f"record {key!r} of {reader.path!r} is not a serialized "
                                 "TensorProtos (a corrupt or foreign database)") from None
        raise


_field_1_tag = bytes([1 << 3 | 2])  # field 1, length-delimited


def _varint(n):
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return out


def _plain_columns(batch, layout, sizes, num_outputs):
    """Each output's values, one column of records at a time, when every record has the first
    one's layout in fields usable as they are (the common case: a few checks per column, no
    per-record Python loop); None otherwise (``_checked_columns`` then finds what differs)."""
    if any(len(protos) != num_outputs for protos in batch):
        return None
    columns = []
    for i, (data_type, dims) in enumerate(layout):
        column = [protos[i] for protos in batch]
        field = _PLAIN_FIELDS.get(data_type)
        if field is None or any(p.data_type != data_type or p.dims != dims or p.data_format
                                or p.HasField("raw_data") for p in column):
            return None
        values = [getattr(p, field) for p in column]
        if any(len(v) != sizes[i] for v in values):
            return None
        columns.append(values)
    return columns


def _checked_columns(reader, records, batch, layout, sizes, num_outputs):
    """Each output's values, record by record: converts what needs converting and names the
    first record that does not fit the batch's first one."""
    columns = [[] for _ in layout]  # output i: the values of each record
    for (key, _value), protos in zip(records, batch):
        if len(protos) != num_outputs:
            raise ValueError(f"record {key!r} of {reader.path!r} holds {len(protos)} "
                             f"TensorProtos, the first record of the batch {num_outputs}")
        for i, p in enumerate(protos):
            data_type, dims = layout[i]
            if p.data_type != data_type or p.dims != dims:
                raise ValueError(f"record {key!r} of {reader.path!r}: TensorProto {i} is "
                                 f"{_describe(p.data_type, p.dims)} but in the batch's first "
                                 f"record {_describe(data_type, dims)}")
            values = _record_values(p)
            if len(values) != sizes[i]:
                raise ValueError(f"record {key!r} of {reader.path!r}: TensorProto {i} holds "
                                 f"{len(values)} values but its dims {dims} need {sizes[i]}")
            columns[i].append(values)
    return columns


# the fields whose values are the tensor's values as they are (no conversion)
_PLAIN_FIELDS = {caffe2_pb2.TensorProto.BYTE: "byte_data",
                 caffe2_pb2.TensorProto.FLOAT: "float_data",
                 caffe2_pb2.TensorProto.DOUBLE: "double_data",
                 caffe2_pb2.TensorProto.INT32: "int32_data",
                 caffe2_pb2.TensorProto.INT64: "int64_data"}


def _record_values(p):
    """One TensorProto's values: its bytes or repeated field when usable as is, else numpy."""
    field = _PLAIN_FIELDS.get(p.data_type)
    if field and p.data_format == 0 and not p.HasField("raw_data"):
        return getattr(p, field)
    return serialize.tensor_data(p)  # raw_data, narrow ints, float16, strings; raises if bad


def _stack(column, data_type, shape):
    """One array of ``shape`` from the records' values."""
    dtype = serialize.numpy_dtype(data_type)
    if all(type(values) is bytes for values in column):  # byte_data: one join, one copy
        flat = np.frombuffer(bytearray().join(column), dtype=np.uint8)  # writable
    else:
        flat = np.fromiter(itertools.chain.from_iterable(column), dtype=dtype,
                           count=sum(map(len, column)))
    return flat.reshape(shape)


def _describe(data_type, dims):
    return f"{caffe2_pb2.TensorProto.DataType.Name(data_type)} {list(dims)}"


class _Prefetcher:
    """Caffe2's PrefetchOperator: handing out a batch reads the next one, so the reader is a
    batch ahead (ops sharing a reader, and a CreateDB that reopens it, see what Caffe2 shows).

    The read-ahead runs in the net's thread. Decoding a batch is Python work that holds the GIL:
    on a worker thread it ran no faster and cost the net's thread more than the read itself (it
    waited for the GIL, and the worker took a core from the ops' intra-op threads): LeNet's
    compiled training iteration was ~2.5% faster with the read made here. A read that fails is
    reported by the run that would have used its batch.
    """

    def __init__(self):
        self._pending = None  # (reader, the batch read ahead, or the exception reading it raised)

    def next_batch(self, reader, read):
        """The batch for this run; then read the following one."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is reader:
            batch = pending[1]
            if isinstance(batch, Exception):
                raise batch
        else:  # first run, or the DBReader blob was replaced: read now
            batch = read(reader)
        try:
            ahead = read(reader)
        except Exception as exc:  # noqa: BLE001 (raised by the run that needs that batch)
            ahead = exc
        self._pending = (reader, ahead)
        return batch

    def close(self):
        """Drop the batch read ahead (called when the net is closed)."""
        self._pending = None


@register_op("TensorProtosDBInput", gradient=NO_GRADIENT, side_effects=True)
def tensor_protos_db_input(ctx, inputs):
    """Read ``batch_size`` TensorProtos records from a DBReader: output i is [B]+protos[i].dims."""
    reader = inputs[0]
    if not isinstance(reader, DBReader):
        raise TypeError(f"input {ctx.input_names[0]!r} must be a DBReader made by CreateDB, "
                        f"not a {type(reader).__name__}")
    batch_size = ctx.arg("batch_size", 0)
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    num_outputs = len(ctx.output_names)
    prefetcher = ctx.state.get("prefetcher")
    if prefetcher is None:
        prefetcher = ctx.state["prefetcher"] = _Prefetcher()
    cache = ctx.state.setdefault("records", {})
    batch = prefetcher.next_batch(reader, lambda r: read_batch(r, batch_size, num_outputs, cache))
    return [serialize.to_torch(arr, ctx.device) for arr in batch]


# --- Save and Load ------------------------------------------------------------------------------

def _db_path(ctx, db):
    # Caffe2 joins root folder and db; os.path.join also lets an absolute ``db`` through.
    return db if ctx.arg("absolute_path", 0) else os.path.join(ctx.root_folder, db)


def _strip(name, prefix):
    # Caffe2 cuts everything up to and including the first occurrence of the prefix.
    pos = name.find(prefix) if prefix else -1
    return name[pos + len(prefix):] if pos >= 0 else name


@register_op("Save", gradient=NO_GRADIENT, cpu_only_inputs=True, side_effects=True)
def save(ctx, inputs):
    """Write the input blobs to a new database ``db`` (keys ``<name>#%<chunk>``)."""
    db_type = ctx.require("db_type")
    path = limits.writable_path(ctx.root_folder, _db_path(ctx, ctx.require("db")),
                                f"operator Save (db {ctx.require('db')!r})")
    names = ctx.arg("blob_name_overrides") or [
        _strip(n, ctx.arg("strip_prefix", "")) for n in ctx.input_names]
    if len(names) != len(inputs):
        raise ValueError(f"Save: blob_name_overrides has {len(names)} names for "
                         f"{len(inputs)} input blobs")
    if len(set(names)) != len(names):
        raise ValueError(f"Save: duplicate blob names {names}")
    with open_db(db_type, path, "new") as db:
        txn = db.new_transaction()
        for name, value in zip(names, inputs):
            for key, record in serialize.serialize_blob(name, value):
                txn.put(key, record)
        txn.commit()
    return []


def _source_names(ctx, load_all):
    """Blob name in the db -> output index (Caffe2's output_indices_)."""
    sources = ctx.arg("source_blob_names") or []
    if sources and len(sources) != len(ctx.output_names):
        raise ValueError(f"Load: {len(sources)} source_blob_names for "
                         f"{len(ctx.output_names)} outputs")
    if sources and ctx.arg("strip_prefix"):
        raise ValueError("Load: strip_prefix and source_blob_names are mutually exclusive")
    if sources and load_all:
        raise ValueError("Load: load_all cannot be used with source_blob_names")
    if load_all:
        return None
    names = sources or ctx.output_names
    if len(set(names)) != len(names):
        raise ValueError(f"Load: duplicate source blob names {names}")
    return {name: i for i, name in enumerate(names)}


def _keep_device(name, tensor_proto):
    """The device a blob was saved from (keep_device=1): its ``device_detail``, else CPU."""
    detail = tensor_proto.device_detail
    if not (tensor_proto.HasField("device_detail")
            and detail.device_type in (caffe2_pb2.CUDA, caffe2_pb2.HIP)):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"Load: blob {name!r} was saved from a GPU and keep_device=1, but "
                           "PyTorch sees no GPU; drop keep_device to load it on the op's device")
    return torch.device("cuda", detail.cuda_gpu_id)


class _LoadState:
    """What one Load run has read so far: assembled blobs, chunks in progress, key origins."""

    def __init__(self, ctx, wanted):
        self.ctx = ctx
        self.wanted = wanted  # None: load_all
        self.prefix = ctx.arg("add_prefix", "")
        self.strip = ctx.arg("strip_prefix", "")
        self.done = {}  # blob name -> (numpy array or bytes, device)
        self.chunks = {}  # blob name -> (TensorChunks, device)
        self.db_of = {}  # blob name -> index of the db it came from
        self.source_of = {}  # blob name -> the name it has in the db (before strip/add prefix)

    def blob_name(self, key):
        """Caffe2's buildBlobNameFromDbKey: cut at '#%', strip_prefix, then add_prefix."""
        return self.prefix + _strip(serialize.blob_name_from_key(key), self.strip)

    def extract(self, db_index, cursor, where):
        """Read records from ``cursor`` until every output is loaded (or the end)."""
        while cursor.valid():
            key = cursor.key()
            name = self.blob_name(key)
            if self.wanted is None or name in self.wanted:
                source = serialize.blob_name_from_key(key)
                if self.source_of.setdefault(name, source) != source:
                    raise ValueError(
                        f"Load: db blobs {self.source_of[name]!r} and {source!r} of {where} both "
                        f"load into {name!r} (strip_prefix={self.strip!r}, add_prefix="
                        f"{self.prefix!r}); change the prefixes or name the blobs to load")
                if self.db_of.setdefault(name, db_index) != db_index:
                    raise ValueError(f"Load: blob {name!r} is in more than one db")
                record = f"record {key!r} of {where}"
                blob = serialize.parse_blob(cursor.value(), record)
                try:
                    self.add(name, blob)
                except ValueError as e:
                    raise ValueError(f"{e} ({record})") from None
                if self.wanted is not None and len(self.done) == len(self.wanted):
                    return  # Caffe2 stops on the last needed record, without advancing
            cursor.next()

    def add(self, name, blob):
        """One record of blob ``name``."""
        if blob.type == serialize.COUNTER_TYPE:
            from caffe2torch.ops.checks import Counter
            if name in self.done or name in self.chunks:
                raise ValueError(f"Load: blob {name!r} appears twice")
            self.done[name] = (Counter(int(blob.tensor.int64_data[0])), None)
            return
        if blob.type == "std::string":
            if name in self.done or name in self.chunks:
                raise ValueError(f"Load: blob {name!r} appears twice")
            self.done[name] = (blob.content, None)
            return
        if name in self.done:
            raise ValueError(f"Load: blob {name!r} has more chunks than its dims hold")
        if name not in self.chunks:
            device = (_keep_device(name, blob.tensor) if self.ctx.arg("keep_device", 0)
                      else self.ctx.device)
            self.chunks[name] = (serialize.TensorChunks(name, blob.tensor), device)
        chunks, device = self.chunks[name]
        chunks.add(blob.tensor)
        if chunks.complete:
            del self.chunks[name]
            self.done[name] = (chunks.value(), device)


@register_op("Load", gradient=NO_GRADIENT, side_effects=True)
def load(ctx, inputs):
    """Load blobs from databases (or DBReader inputs); chunks are assembled by segment."""
    load_all = ctx.arg("load_all", 0)
    state = _LoadState(ctx, _source_names(ctx, load_all))
    if inputs:
        for i, reader in enumerate(inputs):
            if not isinstance(reader, DBReader):
                raise TypeError(f"input {ctx.input_names[i]!r} must be a DBReader made by "
                                f"CreateDB, not a {type(reader).__name__}")
            with reader.lock:  # read from where the reader is, without rewinding
                state.extract(i, reader.cursor, reader.path)
    else:
        db_type = ctx.require("db_type")
        dbs = ctx.arg("dbs") or [ctx.require("db")]
        for i, db in enumerate(dbs):
            path = _db_path(ctx, db)
            with open_db(db_type, path, "read") as source:
                cursor = source.cursor()
                try:
                    state.extract(i, cursor, path)
                finally:
                    cursor.close()
    incomplete = [f"{name!r} ({c.loaded} of {c.total} values)"
                  for name, (c, _) in state.chunks.items()]
    if incomplete:
        raise ValueError(f"Load: chunks missing for blobs {', '.join(incomplete)}")
    values = {name: serialize.to_torch(v, device) if device is not None else v
              for name, (v, device) in state.done.items()}
    if load_all:
        ctx.workspace.blobs.update(values)
        return []
    missing = [n for n in state.wanted if n not in values]
    if missing and not ctx.arg("allow_incomplete", 0):
        raise ValueError(f"Load: expected {len(state.wanted)} blobs, found only "
                         f"{len(values)}; missing {missing}")
    # An output that was not found keeps its current value (allow_incomplete).
    return [values[src] if src in values else ctx.workspace.blobs.get(out)
            for src, out in zip(state.wanted, ctx.output_names)]
