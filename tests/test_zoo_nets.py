"""The model zoo's AlexNet, Inception-v1, ResNet-50 and Detectron Faster R-CNN (R-50-C4) topologies
(../shared/caffe2-artifacts, text NetDefs from facebookarchive/models) run and match plain PyTorch
references written here.

The zoo's weights are Git-LFS pointers, so each reference makes its own weights, in the shapes its
layers need, the first time it asks for them; the test then feeds those same weights to the real
NetDef. A reference that names or shapes a weight differently from the net makes the run fail.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import workspace

ARTIFACTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "caffe2-artifacts"

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def load_net(name):
    return text_format.Parse((ARTIFACTS / name).read_text(), caffe2_pb2.NetDef())


class Weights:
    """Weights made on first use in the shape the reference asks for (He-scaled normals)."""

    def __init__(self, seed, prefix=""):
        self.rng = np.random.default_rng(seed)
        self.prefix = prefix
        self.values = {}

    def get(self, name, shape, kind="weight"):
        """The float32 tensor ``prefix + name`` of ``shape``, made the first time."""
        name = self.prefix + name
        if name not in self.values:
            shape = tuple(shape)
            if kind == "weight":
                v = self.rng.standard_normal(shape) * math.sqrt(2.0 / np.prod(shape[1:]))
            elif kind == "bias":
                v = self.rng.standard_normal(shape) * 0.05
            elif kind == "positive":
                v = self.rng.uniform(0.5, 1.5, shape)
            else:
                raise ValueError(kind)
            self.values[name] = v.astype(np.float32)
        assert self.values[name].shape == tuple(shape), name
        return torch.from_numpy(self.values[name])

    def conv(self, x, name, out_c, k, stride=1, pad=0, bias="_b", group=1):
        w = self.get(name + "_w", (out_c, x.shape[1] // group, k, k))
        b = self.get(name + bias, (out_c,), "bias") if bias else None
        return F.conv2d(x, w, b, stride, pad, 1, group)

    def fc(self, x, name, out, w_shape=None):
        x = x.reshape(x.shape[0], -1)
        w = self.get(name + "_w", w_shape or (out, x.shape[1]))
        return x @ w.reshape(out, -1).T + self.get(name + "_b", (out,), "bias")


def run_net(net, weights, inputs, fetch):
    """Feed the weights and inputs, run the NetDef once, fetch blobs."""
    params = {n for n in net.external_input if n not in inputs}
    unused = params - set(weights.values)
    # Nothing the net reads may be missing; an external input no op reads (a data queue) may be.
    read = {i for op in net.op for i in op.input}
    assert not (unused & read), f"the reference made no weight for {sorted(unused & read)}"
    assert set(weights.values) <= params, sorted(set(weights.values) - params)
    for name, value in {**weights.values, **inputs}.items():
        workspace.FeedBlob(name, value)
    workspace.RunNetOnce(net)
    return [workspace.FetchBlob(n) for n in fetch]


def assert_close(got, expected, rtol=2e-4):
    """Equal up to ``rtol`` of the largest magnitude of ``expected`` (float32 sums differ)."""
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    assert got.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * scale)


def lrn(x):
    return F.local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=1.0)


# --- AlexNet ------------------------------------------------------------------------------------

def alexnet(w, x):
    """BVLC AlexNet: LRN after conv1/conv2, grouped conv2/4/5; pool5 pads right/bottom by 1."""
    x = lrn(F.relu(w.conv(x, "conv1", 96, 11, stride=4)))
    x = lrn(F.relu(w.conv(F.max_pool2d(x, 3, 2), "conv2", 256, 5, pad=2, group=2)))
    x = F.relu(w.conv(F.max_pool2d(x, 3, 2), "conv3", 384, 3, pad=1))
    x = F.relu(w.conv(x, "conv4", 384, 3, pad=1, group=2))
    x = F.relu(w.conv(x, "conv5", 256, 3, pad=1, group=2))
    x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf), 3, 2)
    x = F.relu(w.fc(x, "fc6", 4096))
    x = F.relu(w.fc(x, "fc7", 4096))
    logits = w.fc(x, "fc8", 1000)
    return logits, torch.softmax(logits, 1)


def test_alexnet():
    net = load_net("zoo_bvlc_alexnet_predict_net.pbtxt")
    assert sum(op.type == "LRN" for op in net.op) == 2
    w = Weights(0)
    # 91×91 instead of 227×227: conv5 is 4×4, pool5 2×2, so fc6 reads 1024 features.
    x = np.random.default_rng(1).standard_normal((2, 3, 91, 91)).astype(np.float32)
    logits, prob = alexnet(w, torch.from_numpy(x))
    got = run_net(net, w, {"data": x}, ["fc8", "prob", "norm1"])
    assert_close(got[0], logits)
    assert_close(got[1], prob, rtol=1e-4)
    assert got[2].shape == (2, 96, 21, 21)


# --- Inception-v1 (GoogLeNet) -------------------------------------------------------------------

INCEPTION = {  # 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj (the GoogLeNet paper's table)
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def inception_block(w, x, name):
    c1, r3, c3, r5, c5, pp = INCEPTION[name]
    p = f"inception_{name}/"
    branch1 = F.relu(w.conv(x, p + "1x1", c1, 1))
    branch3 = F.relu(w.conv(F.relu(w.conv(x, p + "3x3_reduce", r3, 1)), p + "3x3", c3, 3, pad=1))
    branch5 = F.relu(w.conv(F.relu(w.conv(x, p + "5x5_reduce", r5, 1)), p + "5x5", c5, 5, pad=2))
    pool = F.relu(w.conv(F.max_pool2d(x, 3, 1, 1), p + "pool_proj", pp, 1))
    return torch.cat([branch1, branch3, branch5, pool], 1)


def inception_v1(w, x):
    """GoogLeNet as the zoo's net has it: floor-mode pools, LRN twice, FC weight (1,1,1000,1024)."""
    x = F.max_pool2d(F.relu(w.conv(x, "conv1/7x7_s2", 64, 7, stride=2, pad=3)), 3, 2)
    x = F.relu(w.conv(F.relu(w.conv(lrn(x), "conv2/3x3_reduce", 64, 1)), "conv2/3x3", 192, 3,
                      pad=1))
    x = F.max_pool2d(lrn(x), 3, 2)
    for name in ("3a", "3b"):
        x = inception_block(w, x, name)
    x = F.max_pool2d(x, 3, 2)
    for name in ("4a", "4b", "4c", "4d", "4e"):
        x = inception_block(w, x, name)
    x = F.max_pool2d(x, 3, 2)
    for name in ("5a", "5b"):
        x = inception_block(w, x, name)
    # AveragePool kernel 7 with pads right/bottom 1 on the 6×6 map: one window, padding not
    # counted, so the mean of the whole map.
    assert x.shape[-2:] == (6, 6)
    x = x.mean((2, 3), keepdim=True)
    logits = w.fc(x, "loss3/classifier", 1000, w_shape=(1, 1, 1000, 1024))
    return logits, torch.softmax(logits, 1)


def test_inception_v1():
    net = load_net("zoo_inception_v1_predict_net.pbtxt")
    w = Weights(2)
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    logits, prob = inception_v1(w, torch.from_numpy(x))
    got = run_net(net, w, {"data": x}, ["loss3/classifier", "prob"])
    assert_close(got[0], logits)
    assert_close(got[1], prob, rtol=1e-4)


# --- ResNet-50 ----------------------------------------------------------------------------------

RESNET_STAGES = ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512))  # stage, blocks, width


def bn(w, x, name):
    c = x.shape[1]
    mean, var = w.get(name + "_rm", (c,), "bias"), w.get(name + "_riv", (c,), "positive")
    return F.batch_norm(x, mean, var, w.get(name + "_s", (c,), "positive"),
                        w.get(name + "_b", (c,), "bias"), False, 0.0, 1e-5)


def resnet50(w, x):
    """Caffe2's ResNet-50 (stride on the 3×3 conv), SpatialBN in test mode after every conv."""
    x = F.max_pool2d(F.relu(bn(w, w.conv(x, "conv1", 64, 7, 2, 3, bias=None), "res_conv1_bn")),
                     3, 2, 1)
    for stage, blocks, width in RESNET_STAGES:
        for i in range(blocks):
            p = f"res{stage}_{i}_"
            stride = 2 if i == 0 and stage > 2 else 1
            y = F.relu(bn(w, w.conv(x, p + "branch2a", width, 1, bias=None), p + "branch2a_bn"))
            y = F.relu(bn(w, w.conv(y, p + "branch2b", width, 3, stride, 1, bias=None),
                          p + "branch2b_bn"))
            y = bn(w, w.conv(y, p + "branch2c", 4 * width, 1, bias=None), p + "branch2c_bn")
            if i == 0:
                x = bn(w, w.conv(x, p + "branch1", 4 * width, 1, stride, bias=None),
                       p + "branch1_bn")
            x = F.relu(y + x)
    logits = w.fc(F.avg_pool2d(x, 7, 1), "pred", 1000)
    return logits, torch.softmax(logits, 1)


def test_resnet50():
    net = load_net("zoo_resnet50_predict_net.pbtxt")
    w = Weights(4, prefix="gpu_0/")
    x = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    logits, prob = resnet50(w, torch.from_numpy(x))
    got = run_net(net, w, {"gpu_0/data": x}, ["gpu_0/pred", "gpu_0/softmax"])
    assert_close(got[0], logits)
    assert_close(got[1], prob, rtol=1e-4)


# --- Detectron Faster R-CNN, R-50-C4 ------------------------------------------------------------

def detectron_resnet_stage(w, x, stage, blocks, width, stride):
    """Detectron's bottleneck blocks: BN folded into conv biases, stride on the first 1×1."""
    for i in range(blocks):
        p = f"res{stage}_{i}_"
        s = stride if i == 0 else 1
        y = F.relu(w.conv(x, p + "branch2a", width, 1, s, bias="_bn_b"))
        y = F.relu(w.conv(y, p + "branch2b", width, 3, 1, 1, bias="_bn_b"))
        y = w.conv(y, p + "branch2c", 4 * width, 1, bias="_bn_b")
        if i == 0:
            x = w.conv(x, p + "branch1", 4 * width, 1, s, bias="_bn_b")
        x = F.relu(y + x)
    return x


def np_nms(boxes, scores, thresh):
    """Detectron's py_cpu_nms (numpy, the +1 pixel convention); ties keep input order."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        with np.errstate(invalid="ignore"):  # empty boxes: a NaN IoU drops the box
            order = order[1:][inter / (areas[i] + areas[order[1:]] - inter) <= thresh]
    return np.array(keep, dtype=np.int64)


def np_bbox_transform(boxes, deltas, weights):
    """Detectron's boxes.bbox_transform (with the corrected −1 on x2, y2)."""
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = np.minimum(deltas[:, 2::4] / ww, np.log(1000.0 / 16.0))
    dh = np.minimum(deltas[:, 3::4] / wh, np.log(1000.0 / 16.0))
    px, py = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = np.exp(dw) * w[:, None], np.exp(dh) * h[:, None]
    out = np.zeros(deltas.shape, deltas.dtype)
    out[:, 0::4], out[:, 1::4] = px - 0.5 * pw, py - 0.5 * ph
    out[:, 2::4], out[:, 3::4] = px + 0.5 * pw - 1, py + 0.5 * ph - 1
    return out


def np_clip(boxes, height, width):
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width - 1)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height - 1)
    return boxes


def np_proposals(probs, deltas, im_info, anchors, post_top):
    """Detectron's GenerateProposalsOp for one image (pre_nms_topN 6000, NMS 0.7, min_size 0)."""
    _, h, w = probs.shape
    sx, sy = np.meshgrid(np.arange(w) * 16.0, np.arange(h) * 16.0)
    shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], 1)
    all_anchors = (anchors[None] + shifts[:, None]).reshape(-1, 4)
    deltas = deltas.transpose(1, 2, 0).reshape(-1, 4)
    scores = probs.transpose(1, 2, 0).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:6000]
    boxes = np_clip(np_bbox_transform(all_anchors[order], deltas[order], (1, 1, 1, 1)),
                    int(im_info[0]), int(im_info[1]))
    scores = scores[order]
    ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    keep = np.where((ws >= 0) & (hs >= 0) & (boxes[:, 0] + ws / 2 < im_info[1])
                    & (boxes[:, 1] + hs / 2 < im_info[0]))[0]
    boxes, scores = boxes[keep], scores[keep]
    keep = np_nms(boxes, scores, 0.7)[:post_top]
    return boxes[keep], scores[keep]


def np_roi_align(feat, rois, scale, pooled):
    """Caffe2's RoIAlign (sampling_ratio 0: adaptive grid), per RoI with numpy index arrays."""
    c, h, w = feat.shape
    out = np.zeros((len(rois), c, pooled, pooled), feat.dtype)
    for r, (x1, y1, x2, y2) in enumerate(rois * scale):
        rw, rh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        gh, gw = int(np.ceil(rh / pooled)), int(np.ceil(rw / pooled))
        ys = y1 + (np.arange(pooled * gh) + 0.5) * rh / (pooled * gh)
        xs = x1 + (np.arange(pooled * gw) + 0.5) * rw / (pooled * gw)

        def axis(v, size):
            ok = (v >= -1) & (v <= size)
            v = np.maximum(v, 0)
            lo = v.astype(np.int64)
            edge = lo >= size - 1
            lo[edge] = size - 1
            v = np.where(edge, lo, v)
            hi = np.where(edge, lo, lo + 1)
            return lo, hi, v - lo, ok

        ylo, yhi, ly, yok = axis(ys, h)
        xlo, xhi, lx, xok = axis(xs, w)
        wy, wx = np.stack([1 - ly, ly]), np.stack([1 - lx, lx])
        samples = sum(wy[a][:, None] * wx[b][None, :] * feat[:, [ylo, yhi][a]][:, :, [xlo, xhi][b]]
                      for a in (0, 1) for b in (0, 1)) * (yok[:, None] & xok[None, :])
        out[r] = samples.reshape(c, pooled, gh, pooled, gw).mean((2, 4))
    return out


def np_box_with_nms_limit(scores, boxes, thresh=0.05, nms=0.5, per_im=100):
    """Detectron's box_results_with_nms_and_limit: (scores, boxes, classes) grouped by class."""
    kept = []
    for j in range(1, scores.shape[1]):
        inds = np.where(scores[:, j] > thresh)[0]
        s, b = scores[inds, j], boxes[inds, 4 * j:4 * j + 4]
        order = np.argsort(-s, kind="stable")
        keep = order[np_nms(b[order], s[order], nms)]
        kept += [(s[k], b[k], j) for k in keep]
    if len(kept) > per_im:
        cut = np.sort([k[0] for k in kept])[-per_im]
        kept = [k for k in kept if k[0] >= cut]
    return (np.array([k[0] for k in kept]), np.array([k[1] for k in kept]).reshape(-1, 4),
            np.array([k[2] for k in kept], np.float32))


def make_anchors():
    """Detectron's 15 RPN anchors (sizes 32..512, aspect ratios 0.5, 1, 2) around a 16-px cell."""
    anchors = []
    for size in (32, 64, 128, 256, 512):
        for ratio in (0.5, 1.0, 2.0):
            w = np.round(np.sqrt(size * size / ratio))
            h = np.round(w * ratio)
            anchors.append([7.5 - (w - 1) / 2, 7.5 - (h - 1) / 2, 7.5 + (w - 1) / 2,
                            7.5 + (h - 1) / 2])
    return np.array(anchors, np.float32)


def test_detectron_faster_rcnn():
    net = load_net("zoo_detectron_faster_rcnn_R-50-C4_predict_net.pbtxt")
    assert {"GenerateProposals", "RoIAlign", "BBoxTransform", "BoxWithNMSLimit"} <= \
        {op.type for op in net.op}
    # Keep the second stage small: 6 RoIs through res5 instead of up to 1000.
    post_top = 6
    proposals = next(op for op in net.op if op.type == "GenerateProposals")
    next(a for a in proposals.arg if a.name == "post_nms_topN").i = post_top

    w = Weights(6)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 3, 64, 80)).astype(np.float32)
    im_info = np.array([[64, 80, 1.0]], np.float32)
    anchors = make_anchors()

    # conv1's bias is named res_conv1_bn_b (the folded batch norm), not conv1_b.
    c1 = F.conv2d(torch.from_numpy(x), w.get("conv1_w", (64, 3, 7, 7)),
                  w.get("res_conv1_bn_b", (64,), "bias"), 2, 3)
    feat = F.max_pool2d(F.relu(c1), 3, 2, 1)
    for stage, blocks, width, stride in ((2, 3, 64, 1), (3, 4, 128, 2), (4, 6, 256, 2)):
        feat = detectron_resnet_stage(w, feat, stage, blocks, width, stride)
    rpn = F.relu(w.conv(feat, "conv_rpn", 1024, 3, pad=1))
    probs = torch.sigmoid(w.conv(rpn, "rpn_cls_logits", 15, 1))
    deltas = w.conv(rpn, "rpn_bbox_pred", 60, 1)
    boxes, roi_probs = np_proposals(probs[0].numpy(), deltas[0].numpy(), im_info[0], anchors,
                                    post_top)
    pooled = torch.from_numpy(np_roi_align(feat[0].numpy(), boxes, 1.0 / 16, 14))
    head = detectron_resnet_stage(w, pooled, 5, 3, 512, 2)
    head = F.avg_pool2d(head, 7)
    cls_prob = torch.softmax(w.fc(head, "cls_score", 81), 1).numpy()
    bbox_pred = w.fc(head, "bbox_pred", 324).numpy()
    pred_boxes = np_clip(np_bbox_transform(boxes, bbox_pred, (10.0, 10.0, 5.0, 5.0)), 64, 80)
    ref = np_box_with_nms_limit(cls_prob, pred_boxes)

    got = run_net(net, w, {"data": x, "im_info": im_info, "anchor": anchors},
                  ["rpn_rois", "rpn_roi_probs", "pool5", "cls_prob", "pred_bbox", "score_nms",
                   "bbox_nms", "class_nms"])
    rois, rpn_probs, pool5, got_cls, got_boxes, score_nms, bbox_nms, class_nms = got
    assert rois.shape == (post_top, 5) and (rois[:, 0] == 0).all()
    np.testing.assert_allclose(rois[:, 1:], boxes, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(rpn_probs, roi_probs, rtol=1e-4)
    assert_close(pool5, pooled.numpy())
    assert_close(got_cls, cls_prob, rtol=1e-4)
    np.testing.assert_allclose(got_boxes, pred_boxes, rtol=1e-4, atol=1e-2)
    assert len(score_nms) == len(ref[0]) > 0
    np.testing.assert_allclose(score_nms, ref[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bbox_nms, ref[1], rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(class_nms, ref[2])
