"""Detectron ops vs references written here as plain loops (Detectron's Python algorithms)."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.ops import registry
from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, device_option, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def run(op_type, inputs, outputs, device="cpu", **args):
    option = device_option(device)
    for name, value in inputs.items():
        workspace.FeedBlob(name, value, device_option=option)
    workspace.RunOperatorOnce(core.CreateOperator(op_type, list(inputs), outputs,
                                                  device_option=option, **args))
    return [workspace.FetchBlob(o) for o in outputs]


# --- references ---------------------------------------------------------------------------------

def py_nms(boxes, scores, thresh, plus_one=1.0):
    """Detectron's py_cpu_nms, written with a Python list of survivors."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        survivors = []
        for j in order:
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, xx2 - xx1 + plus_one) * max(0.0, yy2 - yy1 + plus_one)
            area = lambda b: (b[2] - b[0] + plus_one) * (b[3] - b[1] + plus_one)  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) <= thresh:
                survivors.append(j)
        order = survivors
    return keep


def py_bbox_transform(box, delta, weights=(1.0, 1.0, 1.0, 1.0), offset=1.0):
    w, h = box[2] - box[0] + 1.0, box[3] - box[1] + 1.0
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    dx, dy = delta[0] / weights[0], delta[1] / weights[1]
    dw = min(delta[2] / weights[2], math.log(1000.0 / 16.0))
    dh = min(delta[3] / weights[3], math.log(1000.0 / 16.0))
    px, py = dx * w + cx, dy * h + cy
    pw, ph = math.exp(dw) * w, math.exp(dh) * h
    return [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - offset, py + 0.5 * ph - offset]


def py_clip(box, height, width):
    return [min(max(box[0], 0.0), width - 1.0), min(max(box[1], 0.0), height - 1.0),
            min(max(box[2], 0.0), width - 1.0), min(max(box[3], 0.0), height - 1.0)]


def py_generate_proposals(scores, deltas, im_info, anchors, stride, pre, post, thresh, min_size):
    rois, probs = [], []
    n, a, h, w = scores.shape
    for i in range(n):
        cand = []
        for y in range(h):
            for x in range(w):
                for k in range(a):
                    anchor = anchors[k] + np.array([x, y, x, y]) * stride
                    cand.append((float(scores[i, k, y, x]), anchor,
                                 deltas[i, 4 * k:4 * k + 4, y, x]))
        cand.sort(key=lambda c: -c[0])  # stable, as the op's sort
        cand = cand[:pre] if pre > 0 else cand
        boxes, kept_scores = [], []
        for score, anchor, delta in cand:
            box = py_clip(py_bbox_transform(anchor, delta), int(im_info[i][0]), int(im_info[i][1]))
            bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
            ms = min_size * im_info[i][2]
            if bw >= ms and bh >= ms and box[0] + bw / 2 < im_info[i][1] and \
                    box[1] + bh / 2 < im_info[i][0]:
                boxes.append(box)
                kept_scores.append(score)
        keep = py_nms(boxes, kept_scores, thresh) if boxes else []
        keep = keep[:post] if post > 0 else keep
        rois += [[i] + boxes[j] for j in keep]
        probs += [kept_scores[j] for j in keep]
    return np.array(rois, np.float64).reshape(-1, 5), np.array(probs)


def make_anchors(a, rng):
    sizes = rng.uniform(8, 40, size=(a, 2))
    return np.concatenate([-sizes / 2, sizes / 2], 1).astype(np.float32)


@pytest.mark.parametrize("n, a, h, w, pre, post, thresh, min_size", [
    (1, 3, 4, 5, 6000, 300, 0.7, 16.0),
    (2, 2, 5, 4, 20, 8, 0.5, 4.0),
    (1, 4, 3, 3, -1, -1, 0.3, 0.0),
])
def test_generate_proposals(n, a, h, w, pre, post, thresh, min_size):
    rng = np.random.default_rng(n * 7 + a)
    scores = rng.uniform(0, 1, (n, a, h, w)).astype(np.float32)
    deltas = (rng.standard_normal((n, 4 * a, h, w)) * 0.3).astype(np.float32)
    im_info = np.array([[h * 16 - 5, w * 16 - 3, 1.0], [h * 16, w * 16, 1.5]][:n], np.float32)
    anchors = make_anchors(a, rng)
    rois, probs = run("GenerateProposals", {"scores": scores, "deltas": deltas, "im_info": im_info,
                                            "anchors": anchors}, ["rois", "probs"],
                      pre_nms_topN=pre, post_nms_topN=post, nms_thresh=thresh, min_size=min_size,
                      spatial_scale=1.0 / 16)
    ref_rois, ref_probs = py_generate_proposals(scores, deltas.astype(np.float64), im_info,
                                                anchors, 16.0, pre, post, thresh, min_size)
    assert rois.dtype == np.float32 and rois.shape == ref_rois.shape and rois.shape[0] > 0
    np.testing.assert_allclose(rois, ref_rois, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-6)


def test_generate_proposals_is_flagged_data_dependent():
    for op in ("GenerateProposals", "BoxWithNMSLimit"):
        schema = registry.get_schema(op)
        assert schema.data_dependent and not schema.differentiable


def test_generate_proposals_shape_errors():
    with pytest.raises(Exception, match="do not match scores"):
        run("GenerateProposals", {"s": np.zeros((1, 2, 3, 3), np.float32),
                                  "d": np.zeros((1, 4, 3, 3), np.float32),
                                  "i": np.ones((1, 3), np.float32),
                                  "a": np.zeros((2, 4), np.float32)}, ["r", "p"])


@pytest.mark.parametrize("with_batch, apply_scale, weights", [
    (True, False, [10.0, 10.0, 5.0, 5.0]), (False, True, [1.0, 1.0, 1.0, 1.0]),
    (True, True, [2.0, 3.0, 1.0, 0.5])])
def test_bbox_transform(with_batch, apply_scale, weights):
    rng = np.random.default_rng(1)
    m, k = 6, 3
    xy = rng.uniform(0, 50, (m, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 30, (m, 2))], 1).astype(np.float32)
    deltas = (rng.standard_normal((m, 4 * k)) * 0.5).astype(np.float32)
    if with_batch:
        ids = np.array([0, 0, 0, 1, 1, 1], np.float32)[:, None]
        rois = np.concatenate([ids, boxes], 1)
        im_info = np.array([[60, 70, 1.0], [90, 80, 2.0]], np.float32)
    else:
        ids = np.zeros((m, 1))
        rois = boxes
        im_info = np.array([[60, 70, 2.0]], np.float32)
    out, splits = run("BBoxTransform", {"rois": rois, "deltas": deltas, "im_info": im_info},
                      ["boxes", "splits"], weights=weights, apply_scale=int(apply_scale),
                      correct_transform_coords=1)
    ref = np.zeros((m, 4 * k))
    for i in range(m):
        h, w, scale = im_info[int(ids[i, 0])]
        after = scale if apply_scale else 1.0
        for c in range(k):
            box = py_bbox_transform(boxes[i] / scale, deltas[i, 4 * c:4 * c + 4], weights)
            ref[i, 4 * c:4 * c + 4] = np.array(py_clip(box, int(h / scale + .5),
                                                       int(w / scale + .5))) * after
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(splits, [3, 3] if with_batch else [6])


def py_box_with_nms_limit(scores, boxes, score_thresh, nms_thresh, per_im):
    """Detectron's box_results_with_nms_and_limit for one image."""
    dets = []
    for j in range(1, scores.shape[1]):
        inds = [i for i in range(scores.shape[0]) if scores[i, j] > score_thresh]
        b = [boxes[i, 4 * j:4 * j + 4].tolist() for i in inds]
        s = [float(scores[i, j]) for i in inds]
        for kk in py_nms(b, s, nms_thresh):
            dets.append((s[kk], b[kk], j))
    if per_im > 0 and len(dets) > per_im:
        cut = sorted(d[0] for d in dets)[-per_im]
        dets = [d for d in dets if d[0] >= cut]
    return dets


@pytest.mark.parametrize("n, k, per_im, batch", [(20, 4, 100, None), (30, 3, 5, None),
                                                 (16, 3, 4, [10, 6])])
def test_box_with_nms_limit(n, k, per_im, batch):
    rng = np.random.default_rng(n + k)
    scores = rng.uniform(0, 1, (n, k)).astype(np.float32)
    xy = rng.uniform(0, 40, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (n, k, 2))], 2).reshape(n, 4 * k)
    boxes = boxes.astype(np.float32)
    inputs = {"scores": scores, "boxes": boxes}
    if batch:
        inputs["splits"] = np.array(batch, np.float32)
    outs = run("BoxWithNMSLimit", inputs, ["s", "b", "c", "splits_out", "keeps", "sizes"],
               score_thresh=0.2, nms=0.3, detections_per_im=per_im)
    out_s, out_b, out_c, out_splits, keeps, sizes = outs
    start, offset = 0, 0
    for image, count in enumerate(batch or [n]):
        ref = py_box_with_nms_limit(scores[start:start + count], boxes[start:start + count],
                                    0.2, 0.3, per_im)
        got = int(out_splits[image])
        assert got == len(ref) and sizes[image].sum() == got
        ref = sorted(ref, key=lambda d: (d[2], -d[0]))  # grouped by class, best first
        np.testing.assert_allclose(out_s[offset:offset + got], [d[0] for d in ref], rtol=1e-6)
        np.testing.assert_allclose(out_b[offset:offset + got], [d[1] for d in ref], rtol=1e-6)
        np.testing.assert_array_equal(out_c[offset:offset + got], [d[2] for d in ref])
        rows = keeps[offset:offset + got] + start
        cls = out_c[offset:offset + got].astype(int)
        np.testing.assert_array_equal(scores[rows, cls], out_s[offset:offset + got])
        start += count
        offset += got
    assert keeps.dtype == np.int32 and sizes.shape == (len(batch or [n]), k)


def test_box_with_nms_limit_class_options():
    rng = np.random.default_rng(5)
    scores = rng.uniform(0, 1, (8, 3)).astype(np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (8, 1)) + \
        rng.uniform(0, 30, (8, 1)).astype(np.float32)
    s, b, c = run("BoxWithNMSLimit", {"scores": scores, "boxes": boxes}, ["s", "b", "c"],
                  cls_agnostic_bbox_reg=1, output_classes_include_bg_cls=0, score_thresh=0.0,
                  nms=1.0)
    assert len(s) == 16 and set(c.tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(b[:8], boxes[np.argsort(-scores[:, 1], kind="stable")])


def py_bilinear(feat, y, x):
    h, w = feat.shape[-2:]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0 * feat[..., 0, 0]
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yh = yl = h - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xh = xl = w - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    return ((1 - ly) * (1 - lx) * feat[..., yl, xl] + (1 - ly) * lx * feat[..., yl, xh]
            + ly * (1 - lx) * feat[..., yh, xl] + ly * lx * feat[..., yh, xh])


def roi_align_reference(scale, ph, pw, ratio, aligned=False, nhwc=False):
    """Caffe2's RoIAlign as loops over RoIs, bins and samples (autograd gives its gradient)."""
    def forward(x, rois):
        xc = x.permute(0, 3, 1, 2) if nhwc else x
        out = []
        for roi in rois.tolist():
            b, box = (int(roi[0]), roi[1:]) if len(roi) == 5 else (0, roi)
            off = 0.5 if aligned else 0.0
            x1, y1, x2, y2 = [v * scale - off for v in box]
            rw, rh = x2 - x1, y2 - y1
            if not aligned:
                rw, rh = max(rw, 1.0), max(rh, 1.0)
            bh, bw = rh / ph, rw / pw
            gh = ratio if ratio > 0 else math.ceil(rh / ph)
            gw = ratio if ratio > 0 else math.ceil(rw / pw)
            rows = []
            for i in range(ph):
                cols = []
                for j in range(pw):
                    acc = 0.0
                    for iy in range(gh):
                        for ix in range(gw):
                            acc = acc + py_bilinear(xc[b], y1 + i * bh + (iy + .5) * bh / gh,
                                                    x1 + j * bw + (ix + .5) * bw / gw)
                    cols.append(acc / max(gh * gw, 1))
                rows.append(torch.stack(cols, -1))
            out.append(torch.stack(rows, -2))
        y = torch.stack(out)
        return y.permute(0, 2, 3, 1) if nhwc else y
    return forward


def make_rois(rng, r, n, size, with_batch=True):
    xy = rng.uniform(-3, size - 2, (r, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(-0.5, size * 0.8, (r, 2))], 1)
    if not with_batch:
        return boxes
    return np.concatenate([rng.integers(0, n, (r, 1)), boxes], 1)


@pytest.mark.parametrize("args, with_batch, nhwc", [
    (dict(spatial_scale=0.5, pooled_h=2, pooled_w=3, sampling_ratio=2), True, False),
    (dict(spatial_scale=1.0, pooled_h=3, pooled_w=2, sampling_ratio=0), True, False),
    (dict(spatial_scale=0.25, pooled_h=2, pooled_w=2, sampling_ratio=-1, aligned=1), False, False),
    (dict(spatial_scale=0.5, pooled_h=2, pooled_w=2, sampling_ratio=1), True, True),
])
def test_roi_align(args, with_batch, nhwc):
    rng = np.random.default_rng(3)
    n = 2 if with_batch else 1
    x = rand(n, 6, 5, 3) if nhwc else rand(n, 3, 6, 5)
    rois = make_rois(rng, 5, n, 10 if args["spatial_scale"] < 1 else 6, with_batch)
    if nhwc:
        args = dict(args, order="NHWC")
    check_op("RoIAlign", {"X": x, "R": rois}, ["Y"], args,
             roi_align_reference(args["spatial_scale"], args["pooled_h"], args["pooled_w"],
                                 args["sampling_ratio"], args.get("aligned", 0), nhwc),
             no_grad_inputs=("R",))


@pytest.mark.parametrize("device", DEVICES)
def test_roi_align_device_and_float32(device):
    rng = np.random.default_rng(4)
    x = rand(1, 4, 8, 8).astype(np.float32)
    rois = make_rois(rng, 6, 1, 16).astype(np.float32)
    check_op("RoIAlign", {"X": x, "R": rois}, ["Y"],
             dict(spatial_scale=0.5, pooled_h=2, pooled_w=2, sampling_ratio=0),
             roi_align_reference(0.5, 2, 2, 0), no_grad_inputs=("R",), atol=1e-5, rtol=1e-5,
             device=device)


def test_roi_align_no_rois():
    (y,) = run("RoIAlign", {"X": rand(1, 3, 4, 4), "R": np.zeros((0, 5))}, ["Y"], pooled_h=2,
               pooled_w=2)
    assert y.shape == (0, 3, 2, 2)


def roi_pool_reference(scale, ph, pw):
    def c_round(v):
        return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)

    def forward(x, rois):
        n, c, h, w = x.shape
        out = torch.zeros(rois.shape[0], c, ph, pw, dtype=x.dtype)
        arg = torch.full((rois.shape[0], c, ph, pw), -1, dtype=torch.int32)
        for r, roi in enumerate(rois.tolist()):
            b = int(roi[0])
            sw, sh, ew, eh = [c_round(v * scale) for v in roi[1:]]
            bh = np.float32(max(eh - sh + 1, 1)) / np.float32(ph)
            bw = np.float32(max(ew - sw + 1, 1)) / np.float32(pw)
            for i in range(ph):
                h0 = min(max(int(math.floor(np.float32(i) * bh)) + sh, 0), h)
                h1 = min(max(int(math.ceil(np.float32(i + 1) * bh)) + sh, 0), h)
                for j in range(pw):
                    w0 = min(max(int(math.floor(np.float32(j) * bw)) + sw, 0), w)
                    w1 = min(max(int(math.ceil(np.float32(j + 1) * bw)) + sw, 0), w)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    patch = x[b, :, h0:h1, w0:w1].reshape(c, -1)
                    best = patch.argmax(1)
                    out[r, :, i, j] = patch[torch.arange(c), best]
                    arg[r, :, i, j] = ((h0 + best // (w1 - w0)) * w + w0 + best % (w1 - w0)).int()
        return out, arg
    return forward


@pytest.mark.parametrize("scale, ph, pw", [(0.5, 2, 2), (1.0, 3, 2), (0.25, 1, 3)])
def test_roi_pool(scale, ph, pw):
    rng = np.random.default_rng(6)
    x = rng.permutation(2 * 3 * 6 * 7).reshape(2, 3, 6, 7) / 10.0  # distinct values: one argmax
    rois = make_rois(rng, 5, 2, int(8 / scale))
    check_op("RoIPool", {"X": x, "R": rois}, ["Y", "argmax"],
             dict(spatial_scale=scale, pooled_h=ph, pooled_w=pw),
             roi_pool_reference(scale, ph, pw), no_grad_inputs=("R",))


def test_roi_pool_is_test_writes_one_output():
    (y,) = run("RoIPool", {"X": rand(1, 2, 4, 4), "R": np.array([[0, 0, 0, 3, 3.0]])}, ["Y"],
               is_test=1, pooled_h=2, pooled_w=2)
    assert y.shape == (1, 2, 2, 2)


@pytest.mark.parametrize("shape, hs, ws", [((1, 2, 3, 4), 2.0, 2.0), ((2, 1, 4, 3), 1.5, 3.0),
                                           ((1, 1, 1, 2), 3.0, 1.0)])
def test_upsample_bilinear(shape, hs, ws):
    def reference(x):
        n, c, h, w = x.shape
        oh, ow = int(h * hs), int(w * ws)
        rh = (h - 1) / (oh - 1) if oh > 1 else 0.0
        rw = (w - 1) / (ow - 1) if ow > 1 else 0.0
        rows = []
        for i in range(oh):
            y0 = int(rh * i)
            y1 = y0 + (1 if y0 < h - 1 else 0)
            ly = rh * i - y0
            cols = []
            for j in range(ow):
                x0 = int(rw * j)
                x1 = x0 + (1 if x0 < w - 1 else 0)
                lx = rw * j - x0
                cols.append((1 - ly) * ((1 - lx) * x[..., y0, x0] + lx * x[..., y0, x1])
                            + ly * ((1 - lx) * x[..., y1, x0] + lx * x[..., y1, x1]))
            rows.append(torch.stack(cols, -1))
        return torch.stack(rows, -2)
    check_op("UpsampleBilinear", {"X": rand(*shape)}, ["Y"], dict(height_scale=hs, width_scale=ws),
             reference)


def test_upsample_bilinear_scales_input():
    x = rand(1, 2, 3, 3)
    check_op("UpsampleBilinear", {"X": x, "scales": np.array([2.0, 1.0], np.float32)}, ["Y"], {},
             lambda x, s: torch.nn.functional.interpolate(x, size=(6, 3), mode="bilinear",
                                                          align_corners=True),
             no_grad_inputs=("scales",))


def py_soft_nms(boxes, scores, sigma, overlap, min_score, method):
    """Soft-NMS over Python dicts: take the best remaining box, decay the others by overlap."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
        area = lambda t: (t[2] - t[0] + 1) * (t[3] - t[1] + 1)  # noqa: E731
        return w * h / (area(a) + area(b) - w * h)
    remaining = dict(enumerate(scores))
    kept = []
    while remaining:
        i = max(remaining, key=lambda k: (remaining[k], -k))
        kept.append((i, remaining.pop(i)))
        for j in list(remaining):
            o = iou(boxes[i], boxes[j])
            remaining[j] *= (1 - o if o > overlap else 1.0) if method == "linear" else \
                math.exp(-o * o / sigma)
            if remaining[j] < min_score:
                del remaining[j]
    return kept


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_box_with_nms_limit_soft_nms(method):
    rng = np.random.default_rng(11)
    n, k = 12, 3
    scores = rng.uniform(0, 1, (n, k)).astype(np.float32)
    xy = rng.uniform(0, 20, (n, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 20, (n, k, 2))], 2).reshape(n, 4 * k)
    boxes = boxes.astype(np.float32)
    s, b, c = run("BoxWithNMSLimit", {"scores": scores, "boxes": boxes}, ["s", "b", "c"],
                  score_thresh=0.1, nms=0.3, detections_per_im=-1, soft_nms_enabled=1,
                  soft_nms_method=method, soft_nms_sigma=0.5, soft_nms_min_score_thres=0.05)
    offset, decayed = 0, 0
    for j in range(1, k):
        inds = [i for i in range(n) if scores[i, j] > 0.1]
        ref = py_soft_nms([boxes[i, 4 * j:4 * j + 4].tolist() for i in inds],
                          [float(scores[i, j]) for i in inds], 0.5, 0.3, 0.05, method)
        got = len(ref)
        np.testing.assert_array_equal(c[offset:offset + got], j)
        np.testing.assert_allclose(s[offset:offset + got], [r[1] for r in ref], rtol=1e-5)
        np.testing.assert_allclose(b[offset:offset + got],
                                   [boxes[inds[r[0]], 4 * j:4 * j + 4] for r in ref])
        decayed += sum(r[1] < scores[inds[r[0]], j] for r in ref)
        offset += got
    assert offset == len(s) and decayed > 0  # soft NMS decayed some scores rather than dropping


def test_batch_permutation():
    perm = np.array([2, 0, 3, 1], np.int32)
    check_op("BatchPermutation", {"X": rand(4, 3, 2), "I": perm}, ["Y"], {},
             lambda x, i: x[torch.tensor(perm, dtype=torch.long)])


def test_spatial_narrow_as():
    check_op("SpatialNarrowAs", {"A": rand(2, 3, 5, 6), "B": rand(1, 1, 3, 4)}, ["C"], {},
             lambda a, b: a[:, :, :3, :4], no_grad_inputs=("B",))


def test_box_with_nms_limit_without_background_boxes():
    """input_boxes_include_bg_cls=0: scores hold the foreground classes first, background last."""
    rng = np.random.default_rng(8)
    n, k = 10, 3
    scores = rng.uniform(0, 1, (n, k)).astype(np.float32)
    xy = rng.uniform(0, 30, (n, k - 1, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 20, (n, k - 1, 2))], 2).reshape(n, -1)
    boxes = boxes.astype(np.float32)
    s, b, c = run("BoxWithNMSLimit", {"scores": scores, "boxes": boxes}, ["s", "b", "c"],
                  input_boxes_include_bg_cls=0, output_classes_include_bg_cls=0, nms=0.4,
                  score_thresh=0.3)
    offset = 0
    for fg in range(k - 1):
        inds = [i for i in range(n) if scores[i, fg] > 0.3]
        keep = py_nms([boxes[i, 4 * fg:4 * fg + 4].tolist() for i in inds],
                      [float(scores[i, fg]) for i in inds], 0.4)
        rows = [inds[j] for j in keep]
        np.testing.assert_array_equal(s[offset:offset + len(rows)], scores[rows, fg])
        np.testing.assert_array_equal(b[offset:offset + len(rows)], boxes[rows, 4 * fg:4 * fg + 4])
        np.testing.assert_array_equal(c[offset:offset + len(rows)], fg)
        offset += len(rows)
    assert offset == len(s) > 0


def fpn_reference(rois_per_level, probs_per_level, top, lo=2, hi=5):
    """Detectron's collect_and_distribute_fpn_rpn_proposals in numpy."""
    rois = np.concatenate(rois_per_level)
    scores = np.concatenate(probs_per_level)
    rois = rois[np.argsort(-scores, kind="stable")[:top]]
    w = rois[:, 3] - rois[:, 1] + 1
    h = rois[:, 4] - rois[:, 2] + 1
    lvls = np.clip(np.floor(4 + np.log2(np.sqrt(w * h) / 224 + 1e-6)), lo, hi)
    per_level = [rois[lvls == k] for k in range(lo, hi + 1)]
    order = np.concatenate([np.where(lvls == k)[0] for k in range(lo, hi + 1)])
    return rois, per_level, np.argsort(order).astype(np.int32)


def test_collect_and_distribute_fpn_rpn_proposals():
    rng = np.random.default_rng(12)
    rois, probs = [], []
    for n in (6, 4, 3, 2, 1):  # RPN levels 2..6
        xy = rng.uniform(0, 300, (n, 2))
        size = rng.uniform(4, 600, (n, 2))
        rois.append(np.concatenate([rng.integers(0, 2, (n, 1)), xy, xy + size], 1)
                    .astype(np.float32))
        probs.append(rng.uniform(0, 1, n).astype(np.float32))
    inputs = {f"rois{i}": r for i, r in enumerate(rois)}
    inputs.update({f"probs{i}": p for i, p in enumerate(probs)})
    outputs = ["rois"] + [f"rois_fpn{k}" for k in range(2, 6)] + ["restore"]
    got = run("CollectAndDistributeFpnRpnProposals", inputs, outputs, rpn_post_nms_topN=12)
    ref_rois, ref_levels, ref_restore = fpn_reference(rois, probs, 12)
    np.testing.assert_array_equal(got[0], ref_rois)
    for level, expected in zip(got[1:5], ref_levels):
        np.testing.assert_array_equal(level.reshape(-1, 5), expected)
    np.testing.assert_array_equal(got[5], ref_restore)
    assert sum(len(level) for level in got[1:5]) == 12
    # The two halves give the same as the whole.
    (collected,) = run("CollectRpnProposals", inputs, ["collected"], rpn_post_nms_topN=12)
    np.testing.assert_array_equal(collected, ref_rois)
    parts = run("DistributeFpnProposals", {"collected": collected},
                [f"d_fpn{k}" for k in range(2, 6)] + ["d_restore"])
    np.testing.assert_array_equal(parts[-1], ref_restore)


@pytest.mark.parametrize("num_classes", [3, 1])
def test_group_spatial_softmax(num_classes):
    x = rand(2, 2 * num_classes, 3, 2)
    check_op("GroupSpatialSoftmax", {"X": x}, ["Y"], dict(num_classes=num_classes),
             lambda x: torch.softmax(x.reshape(2, 2, num_classes, 3, 2), 2).reshape(x.shape))


def ps_roi_pool_reference(scale, group, dim):
    def c_round(v):
        return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)

    def forward(x, rois):
        n, c, h, w = x.shape
        out = []
        for roi in rois.tolist():
            b = int(roi[0])
            sw, sh = np.float32(c_round(roi[1])) * np.float32(scale), \
                np.float32(c_round(roi[2])) * np.float32(scale)
            ew, eh = np.float32(c_round(roi[3]) + 1) * np.float32(scale), \
                np.float32(c_round(roi[4]) + 1) * np.float32(scale)
            bw = max(ew - sw, np.float32(0.1)) / np.float32(group)
            bh = max(eh - sh, np.float32(0.1)) / np.float32(group)
            bins = torch.zeros(dim, group, group, dtype=x.dtype)
            for i in range(group):
                h0 = min(max(int(math.floor(np.float32(i) * bh + sh)), 0), h)
                h1 = min(max(int(math.ceil(np.float32(i + 1) * bh + sh)), 0), h)
                for j in range(group):
                    w0 = min(max(int(math.floor(np.float32(j) * bw + sw)), 0), w)
                    w1 = min(max(int(math.ceil(np.float32(j + 1) * bw + sw)), 0), w)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    for top in range(dim):
                        ch = (top * group + i) * group + j
                        bins[top, i, j] = x[b, ch, h0:h1, w0:w1].mean()
            out.append(bins)
        return torch.stack(out)
    return forward


@pytest.mark.parametrize("scale, group, dim", [(0.5, 2, 3), (0.25, 3, 1), (1.0, 1, 2)])
def test_ps_roi_pool(scale, group, dim):
    rng = np.random.default_rng(13)
    x = rand(2, dim * group * group, 6, 7)
    rois = make_rois(rng, 5, 2, int(8 / scale))
    check_op("PSRoIPool", {"X": x, "R": rois}, ["Y", "mapping"],
             dict(spatial_scale=scale, group_size=group, output_dim=dim),
             ps_roi_pool_reference(scale, group, dim), no_grad_inputs=("R",))


def test_sample_as():
    labels = np.array([0, 2, -1, 1], np.int32)
    check_op("SampleAs", {"X": rand(4, 3), "labels": labels}, ["Y"], {},
             lambda x, _l: x[torch.tensor(labels) > 0])


def test_empty_inputs_give_empty_detections():
    s, b, c = run("BoxWithNMSLimit", {"scores": np.zeros((0, 3), np.float32),
                                      "boxes": np.zeros((0, 12), np.float32)}, ["s", "b", "c"])
    assert s.shape == (0,) and b.shape == (0, 4) and c.shape == (0,)
    # Every score under the threshold: nothing survives.
    s, b, c = run("BoxWithNMSLimit", {"scores": np.full((4, 3), 0.01, np.float32),
                                      "boxes": rand(4, 12).astype(np.float32)}, ["s", "b", "c"])
    assert s.shape == (0,) and b.shape == (0, 4)
    # min_size larger than the image: no proposal is left.
    rois, probs = run("GenerateProposals", {
        "scores": np.ones((1, 2, 2, 2), np.float32), "deltas": np.zeros((1, 8, 2, 2), np.float32),
        "im_info": np.array([[32, 32, 1.0]], np.float32),
        "anchors": np.array([[0, 0, 15, 15], [0, 0, 7, 7]], np.float32)}, ["rois", "probs"],
        min_size=100.0)
    assert rois.shape == (0, 5) and probs.shape == (0,)
