"""Caffe2's ``make_mnist_db``: convert MNIST IDX files into a minidb or LMDB of TensorProtos.

Usage::

    python -m caffe2torch.binaries.make_mnist_db --image_file t10k-images-idx3-ubyte.gz \\
        --label_file t10k-labels-idx1-ubyte.gz --output_file mnist-test-nchw-lmdb \\
        --db lmdb --channel_first

Record ``%08d`` holds TensorProtos [BYTE image, dims [1,rows,cols] with --channel_first else
[rows,cols,1]; INT32 scalar label (no dims)], byte for byte what Caffe2's tool writes.
"""
import argparse
import gzip
import struct
import sys

import numpy as np

from caffe2torch import __version__
from caffe2torch.db import SUPPORTED_DB_TYPES, open_db
from caffe2torch.proto import caffe2_pb2

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
GZIP_MAGIC = 529205256  # 0x1f8b0808: the first bytes of a gzip file that keeps its name
COMMIT_EVERY = 1000  # Caffe2 commits the transaction every 1000 items


def _read_idx(path, magic, num_dims, what):
    """The header counts and the payload of an IDX file (gunzipped if needed)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # still gzipped (529205256 and other gzip flag bytes)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{what} file {path!r} is a damaged gzip file ({exc})") from None
    header_size = 4 * (1 + num_dims)
    found = struct.unpack(">i", raw[:4])[0] if len(raw) >= 4 else None
    if found is not None and found != magic:
        raise ValueError(f"{what} file {path!r} has magic number {found}, expected {magic}: "
                         f"is it an MNIST {what} IDX file?")
    if len(raw) < header_size:
        raise ValueError(f"{what} file {path!r} is truncated: {len(raw)} bytes, "
                         f"shorter than its {header_size}-byte header")
    counts = struct.unpack(f">{num_dims}i", raw[4:header_size])
    size = int(np.prod(counts))
    payload = raw[header_size:]
    if len(payload) < size:
        raise ValueError(f"{what} file {path!r} is truncated: its header promises {size} bytes "
                         f"of data, it holds {len(payload)}")
    return counts, np.frombuffer(payload, dtype=np.uint8, count=size)


def read_idx_images(path):
    """The images of an IDX image file (magic 2051, gzipped or not) as uint8 [N, rows, cols]."""
    counts, data = _read_idx(path, IMAGE_MAGIC, 3, "image")
    return data.reshape(counts)


def read_idx_labels(path):
    """The labels of an IDX label file (magic 2049, gzipped or not) as uint8 [N]."""
    counts, data = _read_idx(path, LABEL_MAGIC, 1, "label")
    return data.reshape(counts)


def _record_parts(rows, cols, channel_first):
    """The serialized TensorProtos around the pixels: (prefix, suffix per label value).

    Every record is prefix + pixels + suffix[label]; built once with protobuf itself, so the
    bytes are exactly what serializing each record's TensorProtos would give.
    """
    if rows * cols == 0:
        raise ValueError(f"images must not be empty, got {rows}x{cols} pixels")
    marker = b"\xa5" * (rows * cols)  # stand-in pixels, cut out below
    protos = caffe2_pb2.TensorProtos()
    image = protos.protos.add()
    image.dims.extend([1, rows, cols] if channel_first else [rows, cols, 1])
    image.data_type = caffe2_pb2.TensorProto.BYTE
    image.byte_data = marker
    label = protos.protos.add()
    label.data_type = caffe2_pb2.TensorProto.INT32
    label.int32_data.append(0)
    head = protos.SerializeToString()
    start = head.index(marker)
    prefix = head[:start]
    suffixes = []
    for value in range(256):
        label.int32_data[0] = value
        suffixes.append(protos.SerializeToString()[start + len(marker):])
    return prefix, suffixes


def write_mnist_db(images, labels, output_file, db_type, channel_first=False, progress=None):
    """Write uint8 images [N,rows,cols] and labels [N] as Caffe2's MNIST db; returns N."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"need images [N,rows,cols] and labels [N], got {images.shape} and "
                         f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must be in 0..255 (IDX labels are unsigned bytes)")
    prefix, suffixes = _record_parts(images.shape[1], images.shape[2], channel_first)
    with open_db(db_type, output_file, "new") as db:
        txn = db.new_transaction()
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            txn.put(b"%08d" % i, b"".join((prefix, image.tobytes(), suffixes[label])))
            if (i + 1) % COMMIT_EVERY == 0:
                txn.commit()
                if progress is not None:
                    progress(i + 1)
        txn.commit()
    if progress is not None:
        progress(len(images))
    return len(images)


def convert(image_file, label_file, output_file, db_type, data_limit=-1, channel_first=False):
    """Read the IDX files and write the db, like Caffe2's make_mnist_db; returns the count."""
    images = read_idx_images(image_file)
    labels = read_idx_labels(label_file)
    if len(images) != len(labels):
        raise ValueError(f"image file {image_file!r} holds {len(images)} images but label file "
                         f"{label_file!r} holds {len(labels)} labels")
    if data_limit is not None and data_limit >= 0:
        images, labels = images[:data_limit], labels[:data_limit]
    return write_mnist_db(images, labels, output_file, db_type, channel_first)


def _bool_flag(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {text!r}")


def main(argv=None):
    """The command line; exits with status 2 and a one-line message on bad input."""
    parser = argparse.ArgumentParser(
        prog="make_mnist_db", description="Convert MNIST IDX files into a Caffe2 DB.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--image_file", required=True, help="IDX image file (may be gzipped)")
    parser.add_argument("--label_file", required=True, help="IDX label file (may be gzipped)")
    parser.add_argument("--output_file", required=True, help="db to create (lmdb: a folder)")
    parser.add_argument("--db", default="leveldb", help="db type: leveldb (Caffe2's default), "
                        "lmdb or minidb")
    parser.add_argument("--data_limit", type=int, default=-1, help="keep the first N items")
    parser.add_argument("--channel_first", nargs="?", const=True, default=False, type=_bool_flag,
                        metavar="BOOL", help="images as [1,rows,cols] (NCHW) instead of [rows,cols,1]")
    args = parser.parse_args(argv)
    if args.db not in SUPPORTED_DB_TYPES and args.db not in ("MiniDB", "LMDB", "LevelDB"):
        parser.error(f"--db {args.db!r} is not supported: use one of "
                     f"{', '.join(SUPPORTED_DB_TYPES)}")
    try:
        count = convert(args.image_file, args.label_file, args.output_file, args.db,
                        args.data_limit, args.channel_first)
    except (OSError, ValueError) as exc:
        print(f"make_mnist_db: error: {exc}", file=sys.stderr)
        return 2
    print(f"make_mnist_db: wrote {count} items to {args.output_file} ({args.db})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
