"""ImageInput and brew.image_input (Caffe2's image_input_op_test.py, against numpy/Pillow)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from caffe2torch.db import open_db
from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew, core, model_helper, workspace

TP = caffe2_pb2.TensorProto


def _encoded(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _record(image, label, box=None):
    """TensorProtos [image (encoded bytes, or a raw uint8 HWC array), label(, box)]."""
    protos = caffe2_pb2.TensorProtos()
    img = protos.protos.add()
    if isinstance(image, bytes):
        img.data_type = TP.STRING
        img.string_data.append(image)
    else:
        img.data_type = TP.BYTE
        img.dims.extend(image.shape)
        img.byte_data = image.tobytes()
    lab = protos.protos.add()
    if isinstance(label, float):
        lab.data_type = TP.FLOAT
        lab.float_data.append(label)
    else:
        lab.data_type = TP.INT32
        lab.int32_data.append(label)
    if box is not None:
        b = protos.protos.add()
        b.data_type = TP.INT32
        b.int32_data.extend(box)
    return protos.SerializeToString()


def _make_db(path, values, db_type="lmdb"):
    with open_db(db_type, str(path), "new") as db:
        txn = db.new_transaction()
        for i, value in enumerate(values):
            txn.put(b"%08d" % i, value)
        txn.commit()
    return str(path)


def _run(db, n_runs=1, db_type="lmdb", **args):
    """Run CreateDB + ImageInput ``n_runs`` times; the (data, label) of each run."""
    init = core.Net("init")
    init.CreateDB([], "reader", db=db, db_type=db_type)
    workspace.RunNetOnce(init)
    net = core.Net("image_input")
    net.ImageInput("reader", ["data", "label"], **args)
    workspace.CreateNet(net, overwrite=True)
    out = []
    for _ in range(n_runs):
        workspace.RunNet(net.Proto().name)
        out.append((workspace.FetchBlob("data"), workspace.FetchBlob("label")))
    return out


def _rand_image(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("color", [1, 0])
def test_raw_images_central_crop_and_normalization(fresh_workspace, color):
    rng = np.random.default_rng(0)
    imgs = [_rand_image(rng, 8, 12, 3 if color else 1) for _ in range(3)]
    db = _make_db(fresh_workspace / "raw", [_record(im, i) for i, im in enumerate(imgs)])
    mean, std = [10.0, 20.0, 30.0][: 3 if color else 1], [2.0, 4.0, 8.0][: 3 if color else 1]
    (data, label), = _run(db, batch_size=3, scale=8, crop=6, is_test=1, color=color,
                          mean_per_channel=mean, std_per_channel=std)
    assert data.shape == (3, 6, 6, 3 if color else 1) and data.dtype == np.float32
    assert label.dtype == np.int32 and label.tolist() == [0, 1, 2]
    # scale == the shorter side: no resize; the central 6x6 window is rows 1:7, cols 3:9
    want = (np.stack(imgs)[:, 1:7, 3:9].astype(np.float32) - np.float32(mean)) \
        * (np.float32(1) / np.float32(std))
    np.testing.assert_array_equal(data, want)


def test_encoded_png_comes_out_bgr_and_wraps_around(fresh_workspace):
    rng = np.random.default_rng(1)
    imgs = [_rand_image(rng, 6, 6) for _ in range(2)]
    db = _make_db(fresh_workspace / "png", [_record(_encoded(im), 7) for im in imgs])
    runs = _run(db, n_runs=2, batch_size=3, scale=6, crop=6, is_test=1)
    rgb = np.stack([imgs[0], imgs[1], imgs[0]]).astype(np.float32)
    np.testing.assert_array_equal(runs[0][0], rgb[..., ::-1])  # OpenCV's channel order
    rgb = np.stack([imgs[1], imgs[0], imgs[1]]).astype(np.float32)
    np.testing.assert_array_equal(runs[1][0], rgb[..., ::-1])  # the reader wrapped around


@pytest.mark.parametrize("shape,args,scaled", [
    ((20, 40), {"scale": 10}, (10, 20)),            # shorter side to 10
    ((40, 20), {"scale": 10}, (20, 10)),
    ((15, 25), {"scale": 10}, (10, 16)),            # 25 * 10 / 15 = 16.67 truncated
    ((20, 40), {"scale": 10, "warp": 1}, (10, 10)),
    ((20, 40), {"minsize": 10}, (20, 40)),          # big enough: not resized
    ((6, 9), {"minsize": 10}, (10, 15)),            # too small: enlarged
])
def test_scale_minsize_warp_against_pillow(fresh_workspace, shape, args, scaled):
    rng = np.random.default_rng(2)
    img = _rand_image(rng, *shape)
    db = _make_db(fresh_workspace / "scale", [_record(_encoded(img), 0)])
    (data, _), = _run(db, batch_size=1, crop=10, is_test=1, **args)
    h, w = scaled
    if (h, w) != shape:
        bgr = Image.fromarray(np.ascontiguousarray(img[..., ::-1]))
        shrink = h <= shape[0] and w <= shape[1]
        bgr = np.asarray(bgr.resize((w, h), Image.BOX if shrink else Image.BILINEAR))
    else:
        bgr = img[..., ::-1]
    h0, w0 = (h - 10) // 2, (w - 10) // 2
    np.testing.assert_array_equal(data[0], bgr[h0:h0 + 10, w0:w0 + 10].astype(np.float32))


def _crops(img, crop):
    """Every crop x crop window of ``img``, unmirrored and mirrored."""
    h, w = img.shape[:2]
    out = []
    for y in range(h - crop + 1):
        for x in range(w - crop + 1):
            win = img[y:y + crop, x:x + crop]
            out += [win, win[:, ::-1]]
    return out


def test_random_crop_and_mirror_are_reproducible_after_manual_seed(fresh_workspace):
    rng = np.random.default_rng(3)
    img = _rand_image(rng, 9, 9)
    db = _make_db(fresh_workspace / "rand", [_record(img, 0)])
    torch.manual_seed(5)
    first = _run(db, n_runs=3, batch_size=4, scale=9, crop=5, mirror=1, is_test=0)
    torch.manual_seed(5)
    again = _run(db, n_runs=3, batch_size=4, scale=9, crop=5, mirror=1, is_test=0)
    for (a, _), (b, _) in zip(first, again):
        np.testing.assert_array_equal(a, b)
    windows = _crops(img.astype(np.float32), 5)
    seen = set()
    for data, _ in first:
        for item in data:
            matches = [k for k, win in enumerate(windows) if np.array_equal(item, win)]
            assert matches, "an output is not a crop of the image"
            seen.add(matches[0])
    assert len(seen) > 3  # 12 draws over 50 windows: the crops vary
    torch.manual_seed(6)
    other = _run(db, batch_size=4, scale=9, crop=5, mirror=1, is_test=0)
    assert not np.array_equal(other[0][0], first[0][0])


def test_seeded_device_option_gives_the_same_batches(fresh_workspace):
    img = _rand_image(np.random.default_rng(4), 9, 9)
    db = _make_db(fresh_workspace / "seed", [_record(img, 0)])
    opt = core.DeviceOption(caffe2_pb2.CPU, 0, random_seed=11)
    outs = []
    for _ in range(2):
        torch.manual_seed(len(outs))  # the global RNG differs; the op's seed decides
        (data, _), = _run(db, batch_size=4, scale=9, crop=5, mirror=1, is_test=0,
                          device_option=opt)
        outs.append(data)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_bounding_box_from_record_and_default_args(fresh_workspace):
    img = _rand_image(np.random.default_rng(5), 10, 10)
    db = _make_db(fresh_workspace / "box", [_record(img, 0, box=[2, 3, 4, 5]),
                                            _record(img, 1)])
    (data, _), = _run(db, batch_size=2, scale=4, crop=4, is_test=1, color=1)
    np.testing.assert_array_equal(data[0], img[2:6, 3:7].astype(np.float32))  # box 4x5, crop 4
    (data, _), = _run(db, batch_size=2, scale=4, crop=4, is_test=1, bounding_ymin=1,
                      bounding_xmin=1, bounding_height=4, bounding_width=4)
    np.testing.assert_array_equal(data[1], img[1:5, 1:5].astype(np.float32))


def test_float_labels_and_mixed_labels(fresh_workspace):
    img = _rand_image(np.random.default_rng(6), 4, 4)
    db = _make_db(fresh_workspace / "flt", [_record(img, 0.5), _record(img, 1.5)])
    (_, label), = _run(db, batch_size=2, scale=4, crop=4, is_test=1)
    assert label.dtype == np.float32 and label.tolist() == [0.5, 1.5]
    db = _make_db(fresh_workspace / "mix", [_record(img, 0.5), _record(img, 1)])
    with pytest.raises(RuntimeError, match="mixes INT32 and FLOAT labels"):
        _run(db, batch_size=2, scale=4, crop=4, is_test=1)


def _datum(label, data, channels=0, height=0, width=0, encoded=False):
    """Caffe's Datum wire bytes (fields 1-5 and 7)."""
    def varint(v):
        v &= (1 << 64) - 1
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)
    msg = b""
    for number, value in ((1, channels), (2, height), (3, width)):
        if value:
            msg += varint(number << 3) + varint(value)
    msg += varint(4 << 3 | 2) + varint(len(data)) + data
    msg += varint(5 << 3) + varint(label)
    if encoded:
        msg += varint(7 << 3) + varint(1)
    return msg


def test_caffe_datum_raw_chw_and_encoded(fresh_workspace):
    img = _rand_image(np.random.default_rng(7), 5, 5)
    chw = np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
    db = _make_db(fresh_workspace / "datum", [_datum(3, chw, 3, 5, 5),
                                              _datum(-2, _encoded(img), encoded=True)])
    (data, label), = _run(db, batch_size=2, scale=5, crop=5, is_test=1, use_caffe_datum=1)
    assert label.tolist() == [3, -2]
    np.testing.assert_array_equal(data[0], img.astype(np.float32))   # raw: stored order
    np.testing.assert_array_equal(data[1], img[..., ::-1].astype(np.float32))  # decoded: BGR


def test_old_form_opens_its_own_reader(fresh_workspace):
    img = _rand_image(np.random.default_rng(8), 4, 4)
    db = _make_db(fresh_workspace / "own", [_record(img, 4)], db_type="minidb")
    net = core.Net("own_reader")
    net.ImageInput([], ["data", "label"], db=db, db_type="minidb", batch_size=2, scale=4,
                   crop=4, is_test=1)
    workspace.RunNetOnce(net)
    assert workspace.FetchBlob("label").tolist() == [4, 4]


def test_a_shared_reader_hands_records_out_in_order(fresh_workspace):
    """Two ops on one reader (data_parallel_model's devices): each record once per pass."""
    imgs = [np.full((4, 4, 3), i, np.uint8) for i in range(8)]
    db = _make_db(fresh_workspace / "shared", [_record(im, i) for i, im in enumerate(imgs)])
    init = core.Net("init")
    init.CreateDB([], "reader", db=db, db_type="lmdb")
    workspace.RunNetOnce(init)
    net = core.Net("two_devices")
    for d in range(2):
        net.ImageInput("reader", [f"data_{d}", f"label_{d}"], batch_size=2, scale=4, crop=4,
                       is_test=1)
    workspace.CreateNet(net)
    labels = []
    for _ in range(2):
        workspace.RunNet(net.Proto().name)
        labels += [workspace.FetchBlob(f"label_{d}").tolist() for d in range(2)]
    # Each op prefetches its next batch as it hands one out (Caffe2's PrefetchOperator).
    assert labels == [[0, 1], [4, 5], [2, 3], [6, 7]]


@pytest.mark.parametrize("value,why", [
    (b"\x00garbage", "record b'00000000' of"),
    (_record(b"not an image", 0), "cannot be decoded by Pillow"),
    (_record(np.zeros((4, 4, 2), np.uint8), 0), r"dims \[4, 4, 2\]"),
])
def test_bad_records_name_the_record(fresh_workspace, value, why):
    db = _make_db(fresh_workspace / "bad", [value])
    with pytest.raises(RuntimeError, match=why) as info:
        _run(db, batch_size=1, scale=4, crop=4, is_test=1)
    assert "record b'00000000'" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("args,why", [
    ({"batch_size": 0, "scale": 4, "crop": 4}, "batch_size must be > 0"),
    ({"batch_size": 1, "scale": 4, "minsize": 4, "crop": 4}, "exactly one of scale and minsize"),
    ({"batch_size": 1, "crop": 4}, "exactly one of scale and minsize"),
    ({"batch_size": 1, "scale": 4}, "needs crop > 0"),
    ({"batch_size": 1, "scale": 4, "crop": 5}, "no smaller than crop"),
    ({"batch_size": 1, "scale": 4, "crop": 4, "mean_per_channel": [1.0, 2.0],
      "std_per_channel": [1.0, 2.0]}, "1 or 3 values"),
    ({"batch_size": 1, "scale": 4, "crop": 4, "use_gpu_transform": 1}, "only works on a GPU"),
    ({"batch_size": 1, "scale": 4, "crop": 4, "output_type": "int8"}, "float or float16"),
])
def test_bad_arguments(fresh_workspace, args, why):
    db = _make_db(fresh_workspace / "args", [_record(np.zeros((4, 4, 3), np.uint8), 0)])
    with pytest.raises((ValueError, RuntimeError), match=why):
        _run(db, is_test=1, **args)


def test_registered_as_a_side_effect_op():
    schema = registry.get_schema("ImageInput")
    assert schema.side_effects and not schema.differentiable and not schema.traceable


def test_brew_image_input_nchw(fresh_workspace):
    img = _rand_image(np.random.default_rng(9), 6, 6)
    db = _make_db(fresh_workspace / "brew", [_record(_encoded(img), 1)])
    model = model_helper.ModelHelper(name="brew_image_input")
    reader = model.CreateDB("reader", db=db, db_type="lmdb")
    data, label = brew.image_input(model, reader, ["data", "label"], batch_size=2, scale=6,
                                   crop=4, mean=128.0, std=128.0, is_test=True)
    assert [op.type for op in model.net.Proto().op] == ["ImageInput", "NHWC2NCHW"]
    assert str(data) == "data" and model.net.Proto().op[0].output[0] == "data_nhwc"
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    got = workspace.FetchBlob("data")
    want = (img[1:5, 1:5, ::-1].astype(np.float32) - 128) / 128
    np.testing.assert_allclose(got[0], want.transpose(2, 0, 1), rtol=0, atol=1e-7)
    assert workspace.FetchBlob("label").tolist() == [1, 1]
    with pytest.raises(ValueError, match="needs the argument is_test"):
        brew.image_input(model, reader, ["d2", "l2"], batch_size=1, scale=6, crop=4)


def test_brew_image_input_nhwc_keeps_the_op_output():
    model = model_helper.ModelHelper(name="nhwc")
    brew.image_input(model, "reader", ["data", "label"], order="NHWC", batch_size=1, scale=4,
                     crop=4, is_test=False)
    assert [op.type for op in model.net.Proto().op] == ["ImageInput"]
    assert list(model.net.Proto().op[0].output) == ["data", "label"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("output_type,dtype", [("float", np.float32), ("float16", np.float16)])
def test_gpu_transform_outputs_nchw_on_the_device(fresh_workspace, output_type, dtype):
    img = _rand_image(np.random.default_rng(10), 4, 4)
    db = _make_db(fresh_workspace / "gpu", [_record(img, 0)])
    (data, _), = _run(db, batch_size=1, scale=4, crop=4, is_test=1, mean=128.0, std=64.0,
                      use_gpu_transform=1, output_type=output_type,
                      device_option=core.DeviceOption(caffe2_pb2.CUDA, 0))
    want = ((img[..., ::-1].astype(np.float32) - 128) / 64).transpose(2, 0, 1)[None]
    assert data.dtype == dtype
    np.testing.assert_allclose(data.astype(np.float32), want, atol=1e-3)
