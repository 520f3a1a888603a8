"""ImageInput: batches of decoded, scaled, cropped and normalized images from a DB (Caffe2's
``caffe2/image/image_input_op.h``).

Each record is a TensorProtos [image, label(, bounding box)] (or a Caffe ``Datum`` with
``use_caffe_datum=1``): the image an encoded string (JPEG, PNG, ...: decoded with Pillow where
Caffe2 used OpenCV) or raw HWC bytes, the label one INT32 or FLOAT value, the box four INT32
(ymin, xmin, height, width). As in Caffe2 the channels come out in OpenCV's BGR order and the
images as NHWC float32 ``[batch_size, crop, crop, 1 or 3]``: ``(pixel - mean[c]) / std[c]`` of
a crop (random, or central with ``is_test``) of the image after scaling its shorter side to
``scale`` (or at least to ``minsize``; ``warp`` scales both sides), mirrored at random with
``mirror``. ``use_gpu_transform`` (GPU only) outputs the crop as NCHW in ``output_type`` with
the normalization done on the device. The label output is int32 (or float32 for FLOAT labels).

The op reads the next batch's records as soon as it hands out a batch and decodes them on
``decode_threads`` threads while the net runs (Caffe2's prefetching). Its random crops and
mirrors are drawn, record by record in read order, from a generator seeded once from the op's
``random_seed`` or else from torch's global RNG, so runs after ``torch.manual_seed`` repeat.
"""
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from caffe2torch.db import DBReader
from caffe2torch.ops.registry import NO_GRADIENT, register_op
from caffe2torch.proto import caffe2_pb2

_TP = caffe2_pb2.TensorProto
_OUTPUT_TYPES = {"FLOAT": torch.float32, "FLOAT16": torch.float16}


class _Settings:
    """The op's arguments, checked as Caffe2's constructor checks them."""

    def __init__(self, ctx):
        name = f"operator ImageInput ({list(ctx.output_names)})"
        a = ctx.arg
        self.batch_size = int(a("batch_size", 0))
        self.color = bool(a("color", 1))
        self.scale = int(a("scale", -1))
        self.minsize = int(a("minsize", -1))
        self.warp = bool(a("warp", 0))
        self.crop = int(a("crop", -1))
        self.mirror = bool(a("mirror", 0))
        self.is_test = bool(a("is_test", 0))
        self.use_caffe_datum = bool(a("use_caffe_datum", 0))
        self.gpu_transform = bool(a("use_gpu_transform", 0))
        self.decode_threads = max(1, int(a("decode_threads", 4)))
        mean = a("mean_per_channel") or [float(a("mean", 0.0))]
        std = a("std_per_channel") or [float(a("std", 1.0))]
        box = [int(a(k, -1)) for k in ("bounding_ymin", "bounding_xmin", "bounding_height",
                                       "bounding_width")]
        self.default_box = tuple(box) if min(box) >= 0 else None
        if self.batch_size <= 0:
            raise ValueError(f"{name}: batch_size must be > 0, got {self.batch_size}")
        if (self.scale > 0) == (self.minsize > 0):
            raise ValueError(f"{name}: give exactly one of scale and minsize (> 0), got "
                             f"scale={self.scale}, minsize={self.minsize}")
        if self.crop <= 0:
            raise ValueError(f"{name}: needs crop > 0 (the output's height and width)")
        if max(self.scale, self.minsize) < self.crop:
            raise ValueError(f"{name}: scale/minsize ({max(self.scale, self.minsize)}) must be "
                             f"no smaller than crop ({self.crop})")
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"{name}: mean_per_channel and std_per_channel need 1 or 3 values "
                             f"each, and the same number; got {len(mean)} and {len(std)}")
        if len(ctx.output_names) != 2:
            raise ValueError(f"{name}: has 2 outputs (data, label), got "
                             f"{len(ctx.output_names)}")
        channels = 3 if self.color else 1
        # Caffe2 keeps 3 values and multiplies by 1/std; a grayscale image uses the first.
        self.mean = np.array((mean * 3)[:3] if len(mean) == 1 else mean, np.float32)[:channels]
        self.inv_std = (np.float32(1.0) / np.array((std * 3)[:3] if len(std) == 1 else std,
                                                   np.float32))[:channels]
        self.channels = channels
        self.output_type = _output_type(a("output_type", None), name)
        if self.gpu_transform and ctx.device.type != "cuda":
            raise ValueError(f"{name}: use_gpu_transform only works on a GPU (the op's "
                             f"device is {ctx.device}); drop it or run the op on CUDA")


def _output_type(value, name):
    """Caffe2's GetCastDataType: a name ("float", "float16") or a TensorProto.DataType int."""
    if value is None:
        return torch.float32
    key = value.upper() if isinstance(value, str) else _TP.DataType.Name(int(value))
    if key not in _OUTPUT_TYPES:
        raise ValueError(f"{name}: output_type must be float or float16, not {value!r}")
    return _OUTPUT_TYPES[key]


# --- one record -----------------------------------------------------------------------------------

def _varint(buf, i):
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _parse_datum(buf):
    """Caffe's Datum (channels 1, height 2, width 3, data 4, label 5, encoded 7) from its wire
    bytes: a reader of the few fields ImageInput uses, so Caffe's proto need not be shipped."""
    fields = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = bytes(buf[i:i + size]), i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} is not valid in a Datum")
        if i > len(buf):
            raise ValueError("truncated field")
        fields[number] = value
    label = fields.get(5, 0)
    label = label - (1 << 64) if label >= 1 << 63 else label  # negative int32 varints
    return fields, int(label)


def _decode(data, color):
    """Encoded image bytes -> uint8 HxWx3 in BGR order (color) or HxWx1 grayscale."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB" if color else "L"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"its image ({len(data)} bytes) cannot be decoded by Pillow: {e}") \
            from None
    return np.ascontiguousarray(arr[:, :, ::-1]) if color else arr[:, :, None]


def _convert_channels(arr, color):
    """OpenCV's BGR2GRAY / GRAY2BGR when the stored image has the other channel count."""
    if arr.shape[2] == (3 if color else 1):
        return arr
    if color:
        return np.repeat(arr, 3, axis=2)
    b, g, r = (arr[:, :, k].astype(np.float32) for k in range(3))
    gray = np.rint(0.114 * b + 0.587 * g + 0.299 * r)
    return np.clip(gray, 0, 255).astype(np.uint8)[:, :, None]


def _raw_image(proto):
    """A raw BYTE image TensorProto (H, W[, C]) as uint8 HxWxC."""
    dims = list(proto.dims)
    channels = dims[2] if len(dims) == 3 else 1
    if len(dims) not in (2, 3) or channels not in (1, 3):
        raise ValueError(f"its raw BYTE image has dims {dims}; ImageInput needs [H, W] or "
                         "[H, W, 1 or 3]")
    data = proto.byte_data
    if len(data) != dims[0] * dims[1] * channels:
        raise ValueError(f"its raw image holds {len(data)} bytes, its dims {dims} need "
                         f"{dims[0] * dims[1] * channels}")
    return np.frombuffer(data, np.uint8).reshape(dims[0], dims[1], channels)


def _parse_record(value, s):
    """(uint8 HxWxC image in the op's channel count, label, bounding box or None)."""
    box = s.default_box
    if s.use_caffe_datum:
        fields, label = _parse_datum(value)
        data = fields.get(4, b"")
        if fields.get(7, 0):
            img = _decode(data, s.color)
        else:
            c, h, w = fields.get(1, 0), fields.get(2, 0), fields.get(3, 0)
            if c not in (1, 3) or len(data) != c * h * w:
                raise ValueError(f"its raw Datum is {c}x{h}x{w} with {len(data)} bytes; "
                                 "ImageInput needs 1 or 3 channels and C*H*W bytes")
            img = np.frombuffer(data, np.uint8).reshape(c, h, w).transpose(1, 2, 0)
        return _convert_channels(img, s.color), label, box
    protos = caffe2_pb2.TensorProtos.FromString(value).protos
    if len(protos) < 2:
        raise ValueError(f"it holds {len(protos)} TensorProtos; ImageInput needs "
                         "[image, label] or [image, label, bounding box]")
    image, label_proto = protos[0], protos[1]
    if len(protos) == 3:
        if protos[2].data_type != _TP.INT32 or len(protos[2].int32_data) != 4:
            raise ValueError("its bounding box (TensorProto 2) must be 4 INT32 values "
                             "(ymin, xmin, height, width)")
        box = tuple(protos[2].int32_data)
    if image.data_type == _TP.STRING:
        if len(image.string_data) != 1:
            raise ValueError(f"its image TensorProto holds {len(image.string_data)} strings, "
                             "not one encoded image")
        img = _convert_channels(_decode(image.string_data[0], s.color), s.color)
    elif image.data_type == _TP.BYTE:
        img = _convert_channels(_raw_image(image), s.color)
    else:
        raise ValueError(f"its image is a {_TP.DataType.Name(image.data_type)} TensorProto; "
                         "ImageInput reads STRING (encoded) or BYTE (raw HWC) images")
    if label_proto.data_type == _TP.INT32 and len(label_proto.int32_data) == 1:
        label = int(label_proto.int32_data[0])
    elif label_proto.data_type == _TP.FLOAT and len(label_proto.float_data) == 1:
        label = float(label_proto.float_data[0])
    else:
        raise ValueError("its label (TensorProto 1) must be one INT32 or FLOAT value, not "
                         f"{_TP.DataType.Name(label_proto.data_type)} with dims "
                         f"{list(label_proto.dims)}")
    return img, label, box


def _scale(img, s, box):
    """The bounding box (when it fits the image, as Caffe2 checks), then Caffe2's
    scale/minsize/warp resize (INTER_AREA: Pillow's BOX filter when shrinking, bilinear when
    enlarging, as INTER_AREA does)."""
    from PIL import Image
    rows, cols = img.shape[:2]
    if box is not None:
        ymin, xmin, height, width = box
        if ymin + height <= rows and xmin + width <= cols and height > 0 and width > 0:
            img = img[ymin:ymin + height, xmin:xmin + width]
            rows, cols = img.shape[:2]
    size = s.scale if s.scale > 0 else s.minsize
    if s.warp:
        height, width = size, size
    elif rows > cols:  # Caffe2 computes the long side in float32 and truncates
        width, height = size, int(np.float32(rows) * np.float32(size) / np.float32(cols))
    else:
        height, width = size, int(np.float32(cols) * np.float32(size) / np.float32(rows))
    if (s.scale > 0 and (height, width) != (rows, cols)) or height > rows or width > cols:
        shrink = height <= rows and width <= cols
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        pil = pil.resize((width, height), Image.BOX if shrink else Image.BILINEAR)
        img = np.asarray(pil).reshape(height, width, img.shape[2])
    return img


def _crop(img, s, draw):
    """The crop x crop window (random or central), mirrored when drawn; HxWxC uint8."""
    rows, cols = img.shape[:2]
    if rows < s.crop or cols < s.crop:
        raise ValueError(f"its scaled image is {rows}x{cols}, smaller than crop {s.crop}")
    u_w, u_h, flip = draw
    if s.is_test:
        w0, h0 = (cols - s.crop) // 2, (rows - s.crop) // 2
    else:
        w0 = min(int(u_w * (cols - s.crop + 1)), cols - s.crop)
        h0 = min(int(u_h * (rows - s.crop + 1)), rows - s.crop)
    out = img[h0:h0 + s.crop, w0:w0 + s.crop]
    return out[:, ::-1] if flip else out


class _Record:
    """One record's work: decode, scale, crop (the draws were made when it was read)."""

    __slots__ = ("key", "value", "draw")

    def __init__(self, key, value, draw):
        self.key, self.value, self.draw = key, value, draw


def _process(record, s, where):
    try:
        img, label, box = _parse_record(record.value, s)
        return np.ascontiguousarray(_crop(_scale(img, s, box), s, record.draw)), label
    except Exception as e:  # noqa: BLE001 (named with the record, as one line)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"ImageInput: record {record.key!r} of {where}: {why}") from None


# --- the op ---------------------------------------------------------------------------------------

class _Pipeline:
    """Reads a batch's records, draws their crops and mirrors, decodes them on worker threads.

    Records and draws are taken in the calling thread, in order, so which record gets which
    crop never depends on thread timing; only decoding runs on the workers.
    """

    def __init__(self, settings, seed):
        self.s = settings
        self.rng = torch.Generator().manual_seed(seed)
        self.pool = ThreadPoolExecutor(max_workers=settings.decode_threads,
                                       thread_name_prefix="ImageInput")
        self.pending = None  # (reader, [futures])

    def _draws(self, n):
        u = torch.rand((n, 3), generator=self.rng, dtype=torch.float64).tolist()
        return [(uw, uh, self.s.mirror and m < 0.5) for uw, uh, m in u]

    def start(self, reader):
        """Read the next batch's records now; decode them in the background."""
        records = reader.read_many(self.s.batch_size)
        where = f"{reader.path!r}"
        futures = [self.pool.submit(_process, _Record(k, v, d), self.s, where)
                   for (k, v), d in zip(records, self._draws(len(records)))]
        return reader, futures

    def next_batch(self, reader):
        """This run's (images uint8 NHWC, labels); the following batch starts decoding."""
        pending, self.pending = self.pending, None
        if pending is None or pending[0] is not reader:
            if pending is not None:
                for f in pending[1]:
                    f.cancel()
            pending = self.start(reader)
        results = [f.result() for f in pending[1]]
        self.pending = self.start(reader)
        labels = [label for _, label in results]
        kinds = {type(label) for label in labels}
        if len(kinds) > 1:
            raise ValueError("ImageInput: the batch mixes INT32 and FLOAT labels; every record "
                             "of a DB needs the same label type")
        label_dtype = np.float32 if float in kinds else np.int32
        return np.stack([img for img, _ in results]), np.array(labels, dtype=label_dtype)

    def close(self):
        """Stop the decode threads (called when the net is closed)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending = None


def _setup(ctx):
    settings = _Settings(ctx)
    if not ctx.input_names:
        # Caffe2's old form: the op opens its own reader from db / db_type.
        db = ctx.arg("db", "")
        if not db:
            raise ValueError("operator ImageInput without a DBReader input needs argument "
                             "'db' (and db_type, default leveldb)")
        ctx.state["reader"] = DBReader(ctx.arg("db_type", "leveldb"), db)
    # One seed per op, drawn when the net is created: from the op's seeded generator when its
    # DeviceOption has a random_seed, else from torch's global RNG (torch.manual_seed).
    gen = ctx.generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen,
                             device=gen.device if gen is not None else "cpu").item())
    ctx.state["pipeline"] = _Pipeline(settings, seed)


@register_op("ImageInput", gradient=NO_GRADIENT, setup=_setup, side_effects=True)
def image_input(ctx, inputs):
    """Read batch_size images and labels from a DBReader: NHWC float crops (BGR) and labels."""
    reader = inputs[0] if inputs else ctx.state["reader"]
    if not isinstance(reader, DBReader):
        raise TypeError(f"input {ctx.input_names[0]!r} must be a DBReader made by CreateDB, "
                        f"not a {type(reader).__name__}")
    pipeline = ctx.state["pipeline"]
    s = pipeline.s
    images, labels = pipeline.next_batch(reader)
    labels = torch.from_numpy(labels).to(ctx.device)
    if s.gpu_transform:
        # Caffe2's TransformOnGPU: uint8 NHWC up to the device, normalized there into NCHW.
        x = torch.from_numpy(images).to(ctx.device).permute(0, 3, 1, 2).float()
        mean = torch.from_numpy(s.mean).to(ctx.device).view(1, -1, 1, 1)
        inv_std = torch.from_numpy(s.inv_std).to(ctx.device).view(1, -1, 1, 1)
        return [((x - mean) * inv_std).to(s.output_type).contiguous(), labels]
    data = (images.astype(np.float32) - s.mean) * s.inv_std
    return [torch.from_numpy(data).to(ctx.device), labels]


def image_shape(batch_size, crop, color=True):
    """The data output's NHWC shape (Caffe2's tensor inference for ImageInput)."""
    return [batch_size, crop, crop, 3 if color else 1]

