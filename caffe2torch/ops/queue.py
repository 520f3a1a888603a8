"""Blob queues: CreateBlobsQueue, EnqueueBlobs, DequeueBlobs, their Safe* forms and CloseBlobsQueue.

A queue blob holds a bounded, thread-safe FIFO of records (one tensor per queue field), as
Caffe2's BlobsQueue does: producers and consumers are nets run from different threads. Enqueue
blocks while the queue is full, dequeue while it is empty (``timeout_secs`` bounds the wait);
a closed queue refuses enqueues and, once drained, dequeues (the Safe* ops report that in a
status output instead of failing).
"""
import threading
import time

import torch

from caffe2torch.ops.registry import NO_GRADIENT, register_op


class BlobsQueue:
    """What CreateBlobsQueue stores: a bounded FIFO of records of ``num_blobs`` tensors."""

    def __init__(self, name, capacity, num_blobs, field_names=()):
        self.name = name
        self.capacity = capacity
        self.num_blobs = num_blobs
        self.field_names = list(field_names)
        self.records = []
        self.closed = False
        self.cond = threading.Condition()

    def __repr__(self):
        return f"<Caffe2 BlobsQueue {self.name!r}: {len(self.records)}/{self.capacity} records>"

    def put(self, record):
        """Append ``record``, waiting for room; False when the queue is (or gets) closed."""
        with self.cond:
            while len(self.records) >= self.capacity and not self.closed:
                self.cond.wait()
            if self.closed:
                return False
            self.records.append(record)
            self.cond.notify_all()
            return True

    def get(self, timeout=None):
        """The oldest record, waiting for one; None when closed and empty or on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not self.records and not self.closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.cond.wait(left)
            if not self.records:
                return None
            record = self.records.pop(0)
            self.cond.notify_all()
            return record

    def close(self):
        """Refuse new records and wake every waiting producer and consumer."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _create_setup(ctx):
    capacity, num_blobs = int(ctx.require("capacity")), int(ctx.require("num_blobs"))
    if capacity < 1 or num_blobs < 1:
        raise ValueError(f"operator CreateBlobsQueue: capacity and num_blobs must be >= 1, got "
                         f"{capacity} and {num_blobs}")
    fields = ctx.arg("field_names", [])
    if fields and len(fields) != num_blobs:
        raise ValueError(f"operator CreateBlobsQueue: {len(fields)} field_names for num_blobs="
                         f"{num_blobs}")
    ctx.state["queue"] = (ctx.arg("name", ctx.output_names[0]), capacity, num_blobs, fields)


@register_op("CreateBlobsQueue", gradient=NO_GRADIENT, setup=_create_setup, side_effects=True)
def create_blobs_queue(ctx, inputs):
    """Y = a new queue of ``capacity`` records of ``num_blobs`` blobs each."""
    return [BlobsQueue(*ctx.state["queue"])]


def _queue(ctx, value):
    if not isinstance(value, BlobsQueue):
        raise ValueError(f"operator {ctx.op.type}: blob {ctx.input_names[0]!r} is not a queue; "
                         "create it with CreateBlobsQueue")
    return value


def _check_width(ctx, queue, n):
    if n != queue.num_blobs:
        raise ValueError(f"operator {ctx.op.type}: queue {queue.name!r} holds {queue.num_blobs} "
                         f"blobs per record, the op has {n}")


def _enqueue(ctx, inputs):
    queue = _queue(ctx, inputs[0])
    blobs = inputs[1:]
    _check_width(ctx, queue, len(blobs))
    # Copies: the producer may overwrite its blobs in place before the consumer reads them.
    record = tuple(b.clone() if isinstance(b, torch.Tensor) else b for b in blobs)
    return queue.put(record), list(blobs)


@register_op("EnqueueBlobs", gradient=NO_GRADIENT, cpu_only_inputs=True, side_effects=True)
def enqueue_blobs(ctx, inputs):
    """(queue, blobs...) -> blobs: append one record, waiting while the queue is full."""
    ok, blobs = _enqueue(ctx, inputs)
    if not ok:
        raise ValueError(f"operator EnqueueBlobs: queue {inputs[0].name!r} is closed")
    return blobs


@register_op("SafeEnqueueBlobs", gradient=NO_GRADIENT, cpu_only_inputs=True, side_effects=True)
def safe_enqueue_blobs(ctx, inputs):
    """(queue, blobs...) -> (blobs..., status): status True when the queue is closed."""
    ok, blobs = _enqueue(ctx, inputs)
    return blobs + [torch.tensor(not ok)]


def _timeout(ctx):
    seconds = float(ctx.arg("timeout_secs", 0.0))
    return seconds if seconds > 0 else None


@register_op("DequeueBlobs", gradient=NO_GRADIENT, cpu_only_inputs=True, side_effects=True,
             data_dependent=True)
def dequeue_blobs(ctx, inputs):
    """(queue) -> blobs: the oldest record, waiting for one (``timeout_secs`` > 0 bounds that)."""
    queue = _queue(ctx, inputs[0])
    _check_width(ctx, queue, len(ctx.output_names))
    record = queue.get(_timeout(ctx))
    if record is None:
        why = "is closed and empty" if queue.closed else f"stayed empty for {_timeout(ctx)} s"
        raise ValueError(f"operator DequeueBlobs: queue {queue.name!r} {why}")
    return list(record)


@register_op("SafeDequeueBlobs", gradient=NO_GRADIENT, cpu_only_inputs=True, side_effects=True,
             data_dependent=True)
def safe_dequeue_blobs(ctx, inputs):
    """(queue) -> (blobs..., status): ``num_records`` records concatenated along dim 0; status
    True (blobs unchanged) when the queue is closed and empty."""
    queue = _queue(ctx, inputs[0])
    width = len(ctx.output_names) - 1
    _check_width(ctx, queue, width)
    records = []
    for _ in range(int(ctx.arg("num_records", 1))):
        record = queue.get(_timeout(ctx))
        if record is None:
            break
        records.append(record)
    if not records:
        blobs = ctx.workspace.blobs
        return [blobs.get(n) for n in ctx.output_names[:width]] + [torch.tensor(True)]
    if len(records) == 1:
        return list(records[0]) + [torch.tensor(False)]
    return [torch.cat(column) for column in zip(*records)] + [torch.tensor(False)]


@register_op("CloseBlobsQueue", gradient=NO_GRADIENT, side_effects=True)
def close_blobs_queue(ctx, inputs):
    """Close the queue: enqueues fail, dequeues drain what is left, then fail."""
    _queue(ctx, inputs[0]).close()
    return []
