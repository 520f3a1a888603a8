"""make_mnist_db: IDX parsing, Caffe2's record layout, byte-identity with a real Caffe2 file."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffe2torch.binaries import make_mnist_db
from caffe2torch.db import open_db
from caffe2torch.db.serialize import Caffe2TensorToNumpyArray
from caffe2torch.proto import caffe2_pb2
from mnist_idx import load_mnist_test, write_idx

ROOT = Path(__file__).resolve().parents[1]
REAL_MINIDB = ROOT / ".." / "shared" / "caffe2-artifacts" / "mnist-test-nhwc-minidb"


@pytest.fixture(scope="module")
def mnist_test():
    return load_mnist_test()


@pytest.fixture(scope="module")
def idx_files(mnist_test, tmp_path_factory):
    """The MNIST test set as IDX files: images gzipped (as downloaded), labels plain."""
    folder = tmp_path_factory.mktemp("idx")
    images, labels = mnist_test
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images, 2051, gz=True)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels, 2049)
    return folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte"


def test_cli_output_is_byte_identical_to_caffe2s(idx_files, tmp_path):
    out = tmp_path / "mnist-test-nhwc-minidb"
    images, labels = idx_files
    result = subprocess.run(
        [sys.executable, "-m", "caffe2torch.binaries.make_mnist_db", "--image_file", str(images),
         "--label_file", str(labels), "--output_file", str(out), "--db", "minidb",
         "--data_limit", "1000"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == REAL_MINIDB.read_bytes()


def test_idx_readers(idx_files, mnist_test):
    images = make_mnist_db.read_idx_images(idx_files[0])
    labels = make_mnist_db.read_idx_labels(idx_files[1])
    assert images.dtype == np.uint8 and images.shape == (10000, 28, 28)
    assert labels.dtype == np.uint8 and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    np.testing.assert_array_equal(images, mnist_test[0])


@pytest.mark.parametrize("flag, dims", [
    ("--channel_first", [1, 28, 28]),
    ("--channel_first=true", [1, 28, 28]),
    ("--channel_first=1", [1, 28, 28]),
    ("--channel_first=false", [28, 28, 1]),
    ("--channel_first=0", [28, 28, 1]),
])
def test_channel_first_flag_and_lmdb(idx_files, tmp_path, mnist_test, flag, dims):
    out = tmp_path / "mnist-lmdb"
    argv = ["--image_file", str(idx_files[0]), "--label_file", str(idx_files[1]),
            "--output_file", str(out), "--db", "lmdb", "--data_limit", "20", flag]
    assert make_mnist_db.main(argv) == 0
    with open_db("lmdb", out, "read") as db:
        records = list(db.cursor())
    assert [k for k, _ in records] == [b"%08d" % i for i in range(20)]
    image, label = caffe2_pb2.TensorProtos.FromString(records[3][1]).protos
    assert image.data_type == caffe2_pb2.TensorProto.BYTE and list(image.dims) == dims
    assert label.data_type == caffe2_pb2.TensorProto.INT32 and list(label.dims) == []
    assert list(label.int32_data) == [mnist_test[1][3]]
    np.testing.assert_array_equal(Caffe2TensorToNumpyArray(image).reshape(28, 28),
                                  mnist_test[0][3])


def test_fast_record_bytes_equal_protobuf_serialization(mnist_test, tmp_path):
    images, labels = mnist_test[0][:30], mnist_test[1][:30]
    labels = labels.copy()
    labels[:3] = [0, 200, 255]  # labels above 127 need a two-byte varint
    make_mnist_db.write_mnist_db(images, labels, tmp_path / "x", "minidb", channel_first=True)
    with open_db("minidb", tmp_path / "x", "read") as db:
        records = list(db.cursor())
    for (_key, value), image, label in zip(records, images, labels):
        protos = caffe2_pb2.TensorProtos()
        p = protos.protos.add(dims=[1, 28, 28], data_type=caffe2_pb2.TensorProto.BYTE)
        p.byte_data = image.tobytes()
        protos.protos.add(data_type=caffe2_pb2.TensorProto.INT32, int32_data=[int(label)])
        assert value == protos.SerializeToString()


def test_write_reports_progress_and_respects_limit(mnist_test, tmp_path):
    seen = []
    n = make_mnist_db.write_mnist_db(mnist_test[0][:2500], mnist_test[1][:2500],
                                     tmp_path / "x", "minidb", progress=seen.append)
    assert n == 2500 and seen == [1000, 2000, 2500]


def _cli(tmp_path, images, labels, *extra):
    return subprocess.run(
        [sys.executable, "-m", "caffe2torch.binaries.make_mnist_db", "--image_file", str(images),
         "--label_file", str(labels), "--output_file", str(tmp_path / "out"), *extra],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_bad_files_exit_2_with_a_one_line_error(tmp_path, idx_files):
    images, labels = idx_files
    wrong_magic = tmp_path / "labels-as-images"
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(struct.pack(">iiii", 2051, 10, 28, 28) + b"\0" * 100))
    few_labels = tmp_path / "few-labels"
    write_idx(few_labels, np.zeros(5, np.uint8), 2049)
    write_idx(wrong_magic, np.zeros(5, np.uint8), 2049)
    cases = [
        (wrong_magic, labels, "magic number 2049, expected 2051", wrong_magic.name),
        (truncated, labels, "is truncated", truncated.name),
        (images, few_labels, "holds 10000 images but label file", few_labels.name),
        (tmp_path / "missing", labels, "No such file", "missing"),
    ]
    for image_file, label_file, message, name in cases:
        result = _cli(tmp_path, image_file, label_file, "--db", "minidb")
        assert result.returncode == 2
        assert message in result.stderr and name in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_db_type_is_a_usage_error(tmp_path, idx_files):
    result = _cli(tmp_path, *idx_files, "--db", "rocksdb")
    assert result.returncode == 2 and "'rocksdb' is not supported" in result.stderr
    with pytest.raises(ValueError, match="'rocksdb' is not supported"):
        make_mnist_db.convert(*idx_files, tmp_path / "x", "rocksdb")
