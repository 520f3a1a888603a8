"""Blob queues: CreateBlobsQueue, EnqueueBlobs, DequeueBlobs, their Safe* forms, CloseBlobsQueue."""
import threading

import numpy as np
import pytest

from caffe2torch.ops import registry
from caffe2torch.python import core, workspace

from .helpers import rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def run(op_type, inputs, outputs, **args):
    return workspace.RunOperatorOnce(core.CreateOperator(op_type, inputs, outputs, **args))


def test_queue_round_trip_and_close():
    run("CreateBlobsQueue", [], ["q"], capacity=2, num_blobs=2)
    workspace.FeedBlob("a", np.array([1.0], np.float32))
    workspace.FeedBlob("b", np.array([7], np.int32))
    enqueue = core.Net("enqueue")
    enqueue.EnqueueBlobs(["q", "a", "b"], ["a", "b"])
    workspace.RunNetOnce(enqueue)
    workspace.FeedBlob("a", np.array([2.0], np.float32))
    workspace.RunNetOnce(enqueue)
    run("DequeueBlobs", ["q"], ["x", "y"])
    assert workspace.FetchBlob("x") == 1.0 and workspace.FetchBlob("y") == 7
    run("CloseBlobsQueue", ["q"], [])
    run("SafeDequeueBlobs", ["q"], ["x", "y", "status"])
    assert workspace.FetchBlob("x") == 2.0 and not workspace.FetchBlob("status")
    run("SafeDequeueBlobs", ["q"], ["x", "y", "status"])
    assert workspace.FetchBlob("status") and workspace.FetchBlob("x") == 2.0
    with pytest.raises(Exception, match="is closed and empty"):
        run("DequeueBlobs", ["q"], ["x", "y"])
    with pytest.raises(Exception, match="is closed"):
        workspace.RunNetOnce(enqueue)
    run("SafeEnqueueBlobs", ["q", "a", "b"], ["a", "b", "status"])
    assert workspace.FetchBlob("status")


def test_queue_producer_thread_blocks_until_consumer_reads():
    run("CreateBlobsQueue", [], ["q"], capacity=1, num_blobs=1)
    producer = core.Net("producer")
    producer.ConstantFill([], "v", shape=[2], value=3.0)
    producer.EnqueueBlobs(["q", "v"], ["v"])
    thread = threading.Thread(target=workspace.RunNetOnce, args=(producer,), kwargs={})
    workspace.RunNetOnce(producer)  # fills the queue
    thread.start()  # blocks: the queue is full
    thread.join(0.2)
    assert thread.is_alive()
    run("DequeueBlobs", ["q"], ["out"])
    thread.join(5)
    assert not thread.is_alive()
    run("SafeDequeueBlobs", ["q"], ["out", "status"], timeout_secs=0.05)
    np.testing.assert_array_equal(workspace.FetchBlob("out"), [3.0, 3.0])
    run("SafeDequeueBlobs", ["q"], ["out", "status"], timeout_secs=0.05)
    assert workspace.FetchBlob("status")


def test_safe_dequeue_num_records_concatenates():
    run("CreateBlobsQueue", [], ["q"], capacity=4, num_blobs=1)
    for i in range(3):
        workspace.FeedBlob("v", np.array([i, i], np.float32))
        run("EnqueueBlobs", ["q", "v"], ["v"])
    run("SafeDequeueBlobs", ["q"], ["out", "status"], num_records=2)
    np.testing.assert_array_equal(workspace.FetchBlob("out"), [0, 0, 1, 1])


def test_queue_flags():
    for op in ("EnqueueBlobs", "DequeueBlobs", "CreateBlobsQueue", "Checkpoint"):
        assert registry.get_schema(op).side_effects
    assert registry.get_schema("DequeueBlobs").data_dependent


def test_queue_width_mismatch():
    run("CreateBlobsQueue", [], ["q"], capacity=1, num_blobs=2)
    workspace.FeedBlob("v", rand(1))
    with pytest.raises(Exception, match="holds 2 blobs per record, the op has 1"):
        run("EnqueueBlobs", ["q", "v"], ["v"])
