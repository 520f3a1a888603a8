"""Detectron's ops: GenerateProposals, BBoxTransform, BoxWithNMSLimit, RoIAlign, RoIPool and
UpsampleBilinear, in plain PyTorch (torchvision's kernels do not load beside our torch).

Boxes are [x1, y1, x2, y2] in pixels with Caffe2's ``legacy_plus_one`` convention (default 1):
a box's width is x2 − x1 + 1. Greedy NMS runs on the CPU over boxes sorted by score, one
vectorised IoU row per kept box (no M×M matrix). Output sizes of GenerateProposals and
BoxWithNMSLimit depend on the data (flagged in the registry). Rotated boxes are not supported.
"""
import math

import numpy as np
import torch

from caffe2torch.ops._autograd import vjp
from caffe2torch.ops.registry import NO_GRADIENT, gradient_op, grad_name, register_op

# Caffe2's BBOX_XFORM_CLIP_DEFAULT: the largest log-space width/height change of a box.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def _no_rotated(ctx):
    if ctx.arg("rotated", 0):
        raise ValueError(f"operator {ctx.op.type}: rotated boxes (rotated=1) are not supported "
                         "by caffe2torch")


def _plus_one(ctx):
    return 1.0 if ctx.arg("legacy_plus_one", 1) else 0.0


def bbox_transform(boxes, deltas, weights, clip, offset, plus_one):
    """Boxes (M, 4) moved by deltas (M, 4) [dx, dy, dw, dh] / weights (Detectron's transform)."""
    widths = boxes[:, 2] - boxes[:, 0] + plus_one
    heights = boxes[:, 3] - boxes[:, 1] + plus_one
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=clip)
    dh = (deltas[:, 3] / wh).clamp(max=clip)
    pred_x, pred_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = dw.exp() * widths, dh.exp() * heights
    return torch.stack([pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h,
                        pred_x + 0.5 * pred_w - offset, pred_y + 0.5 * pred_h - offset], 1)


def clip_boxes(boxes, height, width, plus_one=1.0):
    """Boxes clipped to the image: x in [0, width − 1], y in [0, height − 1] (legacy +1)."""
    limits = boxes.new_tensor([width - plus_one, height - plus_one] * 2)
    return torch.minimum(boxes, limits).clamp(min=0)


def nms(boxes, thresh, max_keep=-1, plus_one=1.0):
    """Indices kept by greedy NMS of ``boxes`` sorted by descending score (IoU > thresh drops)."""
    b = boxes.detach().cpu().numpy()
    m = b.shape[0]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1 + plus_one) * (y2 - y1 + plus_one)
    suppressed = np.zeros(m, dtype=bool)
    keep = []
    for i in range(m):
        if suppressed[i]:
            continue
        keep.append(i)
        if 0 < max_keep <= len(keep):
            break
        rest = slice(i + 1, None)
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + plus_one, 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + plus_one, 0)
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            # Caffe2 keeps boxes with IoU <= thresh: a NaN IoU (empty boxes) drops the box.
            suppressed[rest] |= ~(inter / (areas[i] + areas[rest] - inter) <= thresh)
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


_SOFT_METHODS = {"linear": 1, "gaussian": 2}


def soft_nms(boxes, scores, indices, sigma, overlap, min_score, method, plus_one=1.0):
    """Soft-NMS (Bodla et al., as Detectron): (kept indices, scores decayed by overlap).

    ``method`` 1 (linear) scales overlapping scores by 1 − IoU above ``overlap``, 2 (gaussian) by
    exp(−IoU²/sigma), 0 drops them; boxes whose score falls below ``min_score`` are discarded.
    """
    b = boxes.detach().cpu().numpy()
    s = scores.detach().cpu().numpy().copy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1 + plus_one) * (y2 - y1 + plus_one)
    pending = [int(i) for i in indices.tolist()]
    keep = []
    while pending:
        pos = int(np.argmax(s[pending]))  # the first maximum, as Eigen's maxCoeff
        i = pending[pos]
        keep.append(i)
        pending[0], pending[pos] = pending[pos], pending[0]
        rest = np.array(pending[1:], dtype=np.int64)
        if rest.size == 0:
            break
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + plus_one, 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + plus_one, 0)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        if method == 1:
            weight = np.where(ovr > overlap, 1.0 - ovr, 1.0)
        elif method == 2:
            weight = np.exp(-ovr * ovr / sigma)
        else:
            weight = np.where(ovr > overlap, 0.0, 1.0)
        s[rest] = s[rest] * weight.astype(s.dtype)
        pending = rest[s[rest] >= min_score].tolist()
    return (torch.tensor(keep, dtype=torch.long, device=boxes.device),
            torch.from_numpy(s).to(scores.device))


def _sort_desc(scores):
    """Indices of ``scores`` from highest to lowest (stable: ties keep their order)."""
    return torch.sort(scores, descending=True, stable=True)[1]


# --- GenerateProposals --------------------------------------------------------------------------

def _proposals_setup(ctx):
    _no_rotated(ctx)
    scale = float(ctx.arg("spatial_scale", 1.0 / 16))
    plus_one = _plus_one(ctx)
    # Old Caffe2 had correct_transform_coords (default 0); later ones always subtract legacy +1.
    offset = 1.0 if ctx.arg("correct_transform_coords", plus_one) else 0.0
    ctx.state["rpn"] = (1.0 / scale, int(ctx.arg("pre_nms_topN", 6000)),
                        int(ctx.arg("post_nms_topN", 300)), float(ctx.arg("nms_thresh", 0.7)),
                        float(ctx.arg("min_size", 16.0)), offset, plus_one)


def all_anchors(anchors, height, width, stride):
    """Anchors (A, 4) shifted to every cell of an H×W map: (H·W·A, 4), rows ordered (h, w, a)."""
    sy = torch.arange(height, dtype=anchors.dtype, device=anchors.device) * stride
    sx = torch.arange(width, dtype=anchors.dtype, device=anchors.device) * stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 1, 4)
    return (shifts + anchors.reshape(1, -1, 4)).reshape(-1, 4)


def _one_image(state, scores, deltas, im_info, anchors):
    stride, pre_top, post_top, thresh, min_size, offset, plus_one = state
    a, h, w = scores.shape
    scores = scores.permute(1, 2, 0).reshape(-1)
    deltas = deltas.reshape(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
    order = _sort_desc(scores)
    if 0 < pre_top < order.numel():
        order = order[:pre_top]
    boxes = bbox_transform(all_anchors(anchors, h, w, stride)[order], deltas[order],
                           (1.0, 1.0, 1.0, 1.0), BBOX_XFORM_CLIP, offset, plus_one)
    info = [float(v) for v in im_info.tolist()]
    boxes = clip_boxes(boxes, int(info[0]), int(info[1]), plus_one)
    scores = scores[order]
    ws = boxes[:, 2] - boxes[:, 0] + plus_one
    hs = boxes[:, 3] - boxes[:, 1] + plus_one
    min_size *= info[2]
    keep = ((ws >= min_size) & (hs >= min_size) & (boxes[:, 0] + ws / 2 < info[1])
            & (boxes[:, 1] + hs / 2 < info[0])).nonzero().reshape(-1)
    boxes, scores = boxes[keep], scores[keep]
    kept = nms(boxes, thresh, post_top if 0 < post_top < keep.numel() else -1, plus_one)
    return boxes[kept], scores[kept]


@register_op("GenerateProposals", gradient=NO_GRADIENT, setup=_proposals_setup,
             data_dependent=True)
def generate_proposals(ctx, inputs):
    """(scores, bbox_deltas, im_info, anchors) -> (rois [R, 5] = (image, x1, y1, x2, y2), probs)."""
    scores, deltas, im_info, anchors = inputs
    if scores.dim() != 4 or anchors.dim() != 2 or anchors.shape[1] != 4:
        raise ValueError(f"operator GenerateProposals: scores must be (N, A, H, W) and anchors "
                         f"(A, 4), got {tuple(scores.shape)} and {tuple(anchors.shape)}")
    n, a, h, w = scores.shape
    if tuple(deltas.shape) != (n, 4 * a, h, w) or tuple(im_info.shape) != (n, 3) \
            or anchors.shape[0] != a:
        raise ValueError(f"operator GenerateProposals: bbox_deltas {tuple(deltas.shape)}, im_info "
                         f"{tuple(im_info.shape)} and anchors {tuple(anchors.shape)} do not match "
                         f"scores {tuple(scores.shape)}: expected ({n}, {4 * a}, {h}, {w}), "
                         f"({n}, 3) and ({a}, 4)")
    rois, probs = [], []
    for i in range(n):
        boxes, p = _one_image(ctx.state["rpn"], scores[i], deltas[i], im_info[i], anchors)
        rois.append(torch.cat([boxes.new_full((boxes.shape[0], 1), float(i)), boxes], 1))
        probs.append(p)
    return [torch.cat(rois), torch.cat(probs)]


# Caffe2 still registers the old name of the C++ op.
register_op("GenerateProposalsCPP", gradient=NO_GRADIENT, setup=_proposals_setup,
            data_dependent=True)(generate_proposals)


# --- BBoxTransform ------------------------------------------------------------------------------

def _bbox_setup(ctx):
    _no_rotated(ctx)
    weights = [float(v) for v in ctx.arg("weights", [1.0, 1.0, 1.0, 1.0])]
    if len(weights) != 4:
        raise ValueError(f"operator BBoxTransform: weights needs 4 values [wx, wy, ww, wh], got "
                         f"{weights}")
    plus_one = _plus_one(ctx)
    offset = 1.0 if ctx.arg("correct_transform_coords", plus_one) else 0.0
    ctx.state["bbox"] = (weights, bool(ctx.arg("apply_scale", 1)), offset, plus_one)


@register_op("BBoxTransform", gradient=NO_GRADIENT, setup=_bbox_setup)
def bbox_transform_op(ctx, inputs):
    """(rois [M, 4|5], deltas [M, 4K], im_info [B, 3]) -> (boxes [M, 4K], roi_batch_splits [B])."""
    weights, apply_scale, offset, plus_one = ctx.state["bbox"]
    rois, deltas, im_info = inputs
    m = rois.shape[0]
    if rois.dim() != 2 or rois.shape[1] not in (4, 5) or deltas.dim() != 2 \
            or deltas.shape[0] != m or deltas.shape[1] % 4:
        raise ValueError(f"operator BBoxTransform: rois must be (M, 4 or 5) and deltas (M, 4·K), "
                         f"got {tuple(rois.shape)} and {tuple(deltas.shape)}")
    batch = im_info.shape[0]
    if rois.shape[1] == 4:
        if batch != 1:
            raise ValueError("operator BBoxTransform: rois without a batch column need im_info "
                             f"of one image, got {batch}")
        counts = [m]
    else:
        ids = rois[:, 0].long()
        counts = torch.bincount(ids.cpu(), minlength=batch).tolist()
        if len(counts) > batch:
            raise ValueError(f"operator BBoxTransform: rois name image {len(counts) - 1} but "
                             f"im_info has {batch} images")
    k = deltas.shape[1] // 4
    boxes = rois[:, -4:]
    out = torch.empty_like(deltas)
    start = 0
    for i, count in enumerate(counts):
        h, w, scale = [float(v) for v in im_info[i].tolist()]
        after = scale if apply_scale else 1.0
        img_h, img_w = int(h / scale + 0.5), int(w / scale + 0.5)
        cur = boxes[start:start + count] / scale
        d = deltas[start:start + count].reshape(count * k, 4)
        moved = bbox_transform(cur.repeat_interleave(k, 0), d, weights, BBOX_XFORM_CLIP, offset,
                               plus_one)
        out[start:start + count] = (clip_boxes(moved, img_h, img_w, plus_one) * after
                                    ).reshape(count, 4 * k)
        start += count
    splits = torch.tensor(counts, dtype=torch.float32, device=deltas.device)
    return [out, splits][:max(1, len(ctx.output_names))]


# --- BoxWithNMSLimit ----------------------------------------------------------------------------

def _box_nms_setup(ctx):
    _no_rotated(ctx)
    soft = None
    if ctx.arg("soft_nms_enabled", 0):
        method = ctx.arg("soft_nms_method", "linear")
        if method not in _SOFT_METHODS:
            raise ValueError(f"operator BoxWithNMSLimit: soft_nms_method must be 'linear' or "
                             f"'gaussian', not {method!r}")
        soft = (float(ctx.arg("soft_nms_sigma", 0.5)),
                float(ctx.arg("soft_nms_min_score_thres", 0.001)), _SOFT_METHODS[method])
    ctx.state["nms"] = (float(ctx.arg("score_thresh", 0.05)), float(ctx.arg("nms", 0.3)),
                        int(ctx.arg("detections_per_im", 100)),
                        bool(ctx.arg("cls_agnostic_bbox_reg", 0)),
                        bool(ctx.arg("input_boxes_include_bg_cls", 1)),
                        bool(ctx.arg("output_classes_include_bg_cls", 1)), _plus_one(ctx), soft)


def _box_col(state, j):
    """The box column of class j (0 = background): Caffe2's get_box_cls_index."""
    agnostic, boxes_bg = state[3], state[4]
    return 0 if agnostic else (j if boxes_bg else j - 1)


def _score_col(state, j):
    """The score column of class j. Without a background box column the scores hold the
    foreground classes first (background last): Caffe2's get_score_cls_index."""
    return j - 1 + int(state[4])


def _nms_one_image(state, scores, boxes):
    """(per-class keeps, scores): keeps are row indices (class 0, the background, stays empty);
    with soft NMS the scores come back decayed."""
    thresh, nms_thresh, per_im, agnostic, boxes_bg, _, plus_one, soft = state
    num_classes = scores.shape[1]
    keeps = [torch.zeros(0, dtype=torch.long, device=scores.device)]
    if soft is not None:
        scores = scores.clone()
    for j in range(1, num_classes):
        col = _box_col(state, j)
        cur = scores[:, _score_col(state, j)]
        inds = (cur > thresh).nonzero().reshape(-1)
        cls_boxes = boxes[:, 4 * col:4 * col + 4]
        if soft is not None:
            sigma, min_score, method = soft
            kept, scores[:, _score_col(state, j)] = soft_nms(
                cls_boxes, cur, inds, sigma, nms_thresh, min_score, method, plus_one)
            keeps.append(kept)
            continue
        inds = inds[_sort_desc(cur[inds])]
        kept = nms(cls_boxes[inds], nms_thresh, per_im if per_im > 0 else -1, plus_one)
        keeps.append(inds[kept])
    total = sum(k.numel() for k in keeps)
    if 0 < per_im < total:
        # Keep the detections_per_im best over all classes.
        cls = torch.cat([torch.full_like(k, j) for j, k in enumerate(keeps)])
        rows = torch.cat(keeps)
        best = _sort_desc(scores[rows, cls - 1 + int(boxes_bg)])[:per_im]
        cls, rows = cls[best], rows[best]
        keeps = [rows[cls == j] for j in range(num_classes)]
    return keeps, scores


@register_op("BoxWithNMSLimit", gradient=NO_GRADIENT, setup=_box_nms_setup, data_dependent=True)
def box_with_nms_limit(ctx, inputs):
    """(scores [N, K], boxes [N, 4K][, batch_splits]) -> (scores, boxes, classes[, splits, keeps,
    keeps_size]): per-class NMS, then the detections_per_im best."""
    state = ctx.state["nms"]
    agnostic, boxes_bg, out_bg = state[3], state[4], state[5]
    scores, boxes = inputs[0], inputs[1]
    scores = scores.reshape(scores.shape[0], -1) if scores.dim() == 4 else scores
    boxes = boxes.reshape(boxes.shape[0], -1) if boxes.dim() == 4 else boxes
    n, num_classes = scores.shape
    box_classes = 1 if agnostic else (num_classes if boxes_bg else num_classes - 1)
    if scores.dim() != 2 or boxes.shape != (n, 4 * box_classes):
        raise ValueError(f"operator BoxWithNMSLimit: boxes {tuple(boxes.shape)} do not match "
                         f"scores {tuple(scores.shape)}: expected ({n}, {4 * box_classes})")
    splits = [n] if len(inputs) < 3 else [int(v) for v in inputs[2].reshape(-1).tolist()]
    if sum(splits) != n:
        raise ValueError(f"operator BoxWithNMSLimit: batch_splits {splits} do not add up to the "
                         f"{n} boxes")
    out_scores, out_boxes, out_classes, out_keeps, sizes = [], [], [], [], []
    start = 0
    for count in splits:
        s, b = scores[start:start + count], boxes[start:start + count]
        keeps, s = _nms_one_image(state, s, b)
        for j, rows in enumerate(keeps):
            if j == 0:
                continue
            col = _box_col(state, j)
            out_scores.append(s[rows, _score_col(state, j)])
            out_boxes.append(b[rows, 4 * col:4 * col + 4])
            out_classes.append(torch.full((rows.numel(),), float(j - (not out_bg)),
                                          device=scores.device))
        out_keeps.extend(keeps)
        sizes.append([k.numel() for k in keeps])
        start += count
    empty = scores.new_zeros(0)
    outputs = [torch.cat(out_scores) if out_scores else empty,
               torch.cat(out_boxes) if out_boxes else scores.new_zeros(0, 4),
               torch.cat(out_classes) if out_classes else empty,
               torch.tensor([sum(s) for s in sizes], dtype=torch.float32, device=scores.device),
               torch.cat(out_keeps).int(),
               torch.tensor(sizes, dtype=torch.int32, device=scores.device)]
    return outputs[:max(3, len(ctx.output_names))]


# --- RoIAlign -----------------------------------------------------------------------------------

def _roi_setup(ctx):
    order = ctx.arg("order", "NCHW")
    if order not in ("NCHW", "NHWC"):
        raise ValueError(f"operator {ctx.op.type}: order must be 'NCHW' or 'NHWC', not {order!r}")
    ctx.state["roi"] = (float(ctx.arg("spatial_scale", 1.0)), int(ctx.arg("pooled_h", 1)),
                        int(ctx.arg("pooled_w", 1)), int(ctx.arg("sampling_ratio", -1)),
                        bool(ctx.arg("aligned", 0)), order == "NHWC")


def _roi_boxes(rois, what):
    if rois.dim() != 2 or rois.shape[1] not in (4, 5):
        raise ValueError(f"operator {what}: RoIs must be (R, 5) [batch index, x1, y1, x2, y2] or "
                         f"(R, 4), got {tuple(rois.shape)}")
    if rois.shape[1] == 5:
        return rois[:, 0].long(), rois[:, 1:]
    return torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device), rois


def _bilinear_axis(coord, size):
    """Per-axis corner indices and weights of Caffe2's bilinear_interpolate; valid mask."""
    valid = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0)
    low = c.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    c = torch.where(edge, low.to(c.dtype), c)
    frac = c - low
    return low, high, 1 - frac, frac, valid


def roi_align(state, x, rois):
    """RoIAlign of ``x`` at ``rois``: the mean of bilinear samples on a grid in each bin."""
    scale, ph, pw, ratio, aligned, nhwc = state
    xc = x.movedim(-1, 1) if nhwc else x
    n, c, h, w = xc.shape
    batch, boxes = _roi_boxes(rois, "RoIAlign")
    r = boxes.shape[0]
    if r == 0:
        y = xc.new_zeros((0, c, ph, pw))
        return y.movedim(1, -1) if nhwc else y
    boxes = boxes.to(xc.dtype) * scale - (0.5 if aligned else 0.0)
    roi_w, roi_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:  # Caffe2 forces malformed RoIs to be 1×1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if ratio > 0:
        grid_h = grid_w = torch.full((r,), ratio, device=xc.device)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph), torch.ceil(roi_w / pw)
    count = (grid_h * grid_w).clamp(min=1).to(xc.dtype)
    table = xc.permute(0, 2, 3, 1).reshape(n * h * w, c)
    base = (batch * (h * w)).reshape(r, 1, 1)
    out = xc.new_zeros((r, ph, pw, c))
    bins_h = torch.arange(ph, device=xc.device, dtype=xc.dtype)
    bins_w = torch.arange(pw, device=xc.device, dtype=xc.dtype)
    # A fixed sampling_ratio fixes the grid; an adaptive one (0) sizes it from the RoI values.
    rows, cols = (ratio, ratio) if ratio > 0 else (int(grid_h.max()), int(grid_w.max()))
    for iy in range(rows):
        yy = boxes[:, 1:2] + bins_h * bin_h[:, None] + (iy + 0.5) * (bin_h / grid_h)[:, None]
        y_lo, y_hi, y_wlo, y_whi, y_ok = _bilinear_axis(yy, h)  # (R, ph)
        y_ok = y_ok & (iy < grid_h)[:, None]
        for ix in range(cols):
            xx = boxes[:, 0:1] + bins_w * bin_w[:, None] + (ix + 0.5) * (bin_w / grid_w)[:, None]
            x_lo, x_hi, x_wlo, x_whi, x_ok = _bilinear_axis(xx, w)  # (R, pw)
            x_ok = x_ok & (ix < grid_w)[:, None]
            ok = (y_ok[:, :, None] & x_ok[:, None, :]).to(xc.dtype)
            for yi, wy in ((y_lo, y_wlo), (y_hi, y_whi)):
                for xi, wx in ((x_lo, x_wlo), (x_hi, x_whi)):
                    idx = base + yi[:, :, None] * w + xi[:, None, :]
                    weight = wy[:, :, None] * wx[:, None, :] * ok
                    # In place: the (R, ph, pw, C) accumulator is the op's largest tensor.
                    out.addcmul_(table[idx], weight[..., None])
    out.div_(count.reshape(r, 1, 1, 1))
    return out if nhwc else out.permute(0, 3, 1, 2).contiguous()


def _roi_align_grad(op, g_output):
    """RoIAlignGradient(X, RoIs, dY) -> dX."""
    return [gradient_op(op, "RoIAlignGradient", [op.input[0], op.input[1], g_output[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0]), None]


@register_op("RoIAlign", gradient=_roi_align_grad, setup=_roi_setup)
def roi_align_op(ctx, inputs):
    """(X, RoIs) -> Y [R, C, pooled_h, pooled_w]: bilinear RoI pooling (Mask R-CNN)."""
    return [roi_align(ctx.state["roi"], *inputs)]


@register_op("RoIAlignGradient", setup=_roi_setup)
def roi_align_gradient(ctx, inputs):
    """(X, RoIs, dY) -> dX: each sample's gradient goes to its four bilinear corners."""
    x, rois, dy = inputs
    return vjp(lambda t: roi_align(ctx.state["roi"], t, rois), [x], [0], [dy])


# --- RoIPool ------------------------------------------------------------------------------------

def _round(v):
    """C's round(): halves away from zero (torch.round rounds them to even)."""
    return (v.sign() * (v.abs() + 0.5).floor()).long()


def roi_pool(state, x, rois):
    """(Y, argmax): the max of each bin of each RoI (Fast R-CNN); argmax = h·W + w, −1 if empty."""
    scale, ph, pw, _, _, nhwc = state
    xc = x.movedim(-1, 1) if nhwc else x
    n, c, h, w = xc.shape
    batch, boxes = _roi_boxes(rois, "RoIPool")
    r = boxes.shape[0]
    start, end = _round(boxes[:, :2] * scale), _round(boxes[:, 2:] * scale)
    # Bin edges in float32, as Caffe2 computes them: floor(i·bin), ceil((i + 1)·bin).
    size = (end - start + 1).clamp(min=1).float()  # (R, 2) as (w, h)
    bin_h, bin_w = size[:, 1] / ph, size[:, 0] / pw
    feats = xc[batch].reshape(r, c, h * w)
    ys = torch.arange(h, device=xc.device)
    xs = torch.arange(w, device=xc.device)
    values = xc.new_zeros((r, c, ph, pw))
    argmax = torch.full((r, c, ph, pw), -1, dtype=torch.int32, device=xc.device)
    for i in range(ph):
        h0 = (torch.floor(i * bin_h).long() + start[:, 1]).clamp(0, h)
        h1 = (torch.ceil((i + 1) * bin_h).long() + start[:, 1]).clamp(0, h)
        in_h = (ys >= h0[:, None]) & (ys < h1[:, None])
        for j in range(pw):
            w0 = (torch.floor(j * bin_w).long() + start[:, 0]).clamp(0, w)
            w1 = (torch.ceil((j + 1) * bin_w).long() + start[:, 0]).clamp(0, w)
            in_w = (xs >= w0[:, None]) & (xs < w1[:, None])
            inside = (in_h[:, :, None] & in_w[:, None, :]).reshape(r, 1, h * w)
            best, where = feats.masked_fill(~inside, -math.inf).max(2)
            empty = ~inside.any(2).expand(r, c)
            values[:, :, i, j] = best.masked_fill(empty, 0.0)
            argmax[:, :, i, j] = where.int().masked_fill(empty, -1)
    if nhwc:
        return values.permute(0, 2, 3, 1), argmax.permute(0, 2, 3, 1)
    return values, argmax


def _roi_pool_setup(ctx):
    _roi_setup(ctx)
    ctx.state["is_test"] = bool(ctx.arg("is_test", 0))


def _roi_pool_grad(op, g_output):
    """RoIPoolGradient(X, RoIs, argmaxes, dY) -> dX."""
    if len(op.output) < 2:
        raise ValueError("the gradient of RoIPool needs its argmaxes: give RoIPool two outputs "
                         "(Y, argmaxes) and is_test=0")
    return [gradient_op(op, "RoIPoolGradient", [op.input[0], op.input[1], op.output[1],
                                                g_output[0]], [grad_name(op.input[0])])], \
        [grad_name(op.input[0]), None]


@register_op("RoIPool", gradient=_roi_pool_grad, setup=_roi_pool_setup)
def roi_pool_op(ctx, inputs):
    """(X, RoIs) -> (Y [R, C, pooled_h, pooled_w], argmaxes unless is_test=1): max RoI pooling."""
    y, argmax = roi_pool(ctx.state["roi"], *inputs)
    if ctx.state["is_test"] or len(ctx.output_names) < 2:
        return [y]
    return [y, argmax]


@register_op("RoIPoolGradient", setup=_roi_pool_setup)
def roi_pool_gradient(ctx, inputs):
    """(X, RoIs, argmaxes, dY) -> dX: each bin's gradient goes to its argmax."""
    x, rois, argmax, dy = inputs
    nhwc = ctx.state["roi"][5]
    xc = x.movedim(-1, 1) if nhwc else x
    if nhwc:
        argmax, dy = argmax.movedim(-1, 1), dy.movedim(-1, 1)
    n, c, h, w = xc.shape
    batch, _ = _roi_boxes(rois, "RoIPoolGradient")
    r = batch.shape[0]
    arg = argmax.reshape(r, c, -1).long()
    hit = arg >= 0
    flat = (batch.reshape(r, 1, 1) * c + torch.arange(c, device=x.device).reshape(1, c, 1)) \
        * (h * w) + arg.clamp(min=0)
    dx = xc.new_zeros(n * c * h * w)
    dx.index_add_(0, flat[hit], dy.reshape(r, c, -1)[hit].to(dx.dtype))
    dx = dx.reshape(n, c, h, w)
    return [dx.movedim(1, -1) if nhwc else dx]


# --- UpsampleBilinear ---------------------------------------------------------------------------

def _upsample_setup(ctx):
    ctx.state["scales"] = (float(ctx.arg("height_scale", 1.0)), float(ctx.arg("width_scale", 1.0)))


def _upsample_scales(ctx, inputs, at):
    if len(inputs) > at:
        values = [float(v) for v in inputs[at].reshape(-1).tolist()]
        if len(values) != 2:
            raise ValueError(f"operator {ctx.op.type}: scales must hold 2 values [height_scale, "
                             f"width_scale], got {values}")
        return values
    return ctx.state["scales"]


def upsample_bilinear(x, out_h, out_w):
    """Caffe2's UpsampleBilinear: corners aligned, (in − 1)/(out − 1) source step."""
    return torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bilinear",
                                           align_corners=True)


def _upsample_grad(op, g_output):
    """UpsampleBilinearGradient(dY, X[, scales]) -> dX."""
    return [gradient_op(op, "UpsampleBilinearGradient", [g_output[0]] + list(op.input),
                        [grad_name(op.input[0])])], [grad_name(op.input[0])] + \
        [None] * (len(op.input) - 1)


@register_op("UpsampleBilinear", gradient=_upsample_grad, setup=_upsample_setup,
             cpu_only_inputs=True)
def upsample_bilinear_op(ctx, inputs):
    """Y = X (NCHW) resized bilinearly to (⌊H·height_scale⌋, ⌊W·width_scale⌋); scales input opt."""
    hs, ws = _upsample_scales(ctx, inputs, 1)
    x = inputs[0].to(ctx.device)
    return [upsample_bilinear(x, int(x.shape[2] * hs), int(x.shape[3] * ws))]


@register_op("UpsampleBilinearGradient", setup=_upsample_setup, cpu_only_inputs=True)
def upsample_bilinear_gradient(ctx, inputs):
    """(dY, X[, scales]) -> dX, the adjoint of the forward's interpolation."""
    dy, x = inputs[0].to(ctx.device), inputs[1].to(ctx.device)
    return vjp(lambda t: upsample_bilinear(t, dy.shape[2], dy.shape[3]), [x], [0], [dy])


# --- BatchPermutation, SpatialNarrowAs (Detectron's FPN and Mask R-CNN glue) ---------------------

def _batch_permutation_grad(op, g_output):
    """BatchPermutationGradient(indices, dY) -> dX."""
    return [gradient_op(op, "BatchPermutationGradient", [op.input[1], g_output[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0]), None]


def _permutation(ctx, indices, n):
    indices = indices.reshape(-1).long()
    if indices.numel() != n:
        raise ValueError(f"operator {ctx.op.type}: {indices.numel()} indices for a batch of {n}")
    return indices


@register_op("BatchPermutation", gradient=_batch_permutation_grad)
def batch_permutation(ctx, inputs):
    """Y[i] = X[indices[i]]: reorder the batch (first) dimension."""
    x, indices = inputs
    return [x[_permutation(ctx, indices, x.shape[0]).to(x.device)]]


@register_op("BatchPermutationGradient")
def batch_permutation_gradient(ctx, inputs):
    """(indices, dY) -> dX with dX[indices[i]] = dY[i]."""
    indices, dy = inputs
    index = _permutation(ctx, indices, dy.shape[0]).to(dy.device)
    return [torch.zeros_like(dy).index_add_(0, index, dy)]


def _narrow_grad(op, g_output):
    """SpatialNarrowAsGradient(A, B, dC) -> dA."""
    return [gradient_op(op, "SpatialNarrowAsGradient", [op.input[0], op.input[1], g_output[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0]), None]


def _narrow_check(ctx, a, b):
    if a.dim() != 4 or b.dim() != 4 or b.shape[2] > a.shape[2] or b.shape[3] > a.shape[3]:
        raise ValueError(f"operator {ctx.op.type}: A {tuple(a.shape)} must be NCHW and at least "
                         f"as large as B {tuple(b.shape)} in H and W")


@register_op("SpatialNarrowAs", gradient=_narrow_grad)
def spatial_narrow_as(ctx, inputs):
    """C = A[:, :, :H_B, :W_B]: cut A to B's spatial size (NCHW)."""
    a, b = inputs
    _narrow_check(ctx, a, b)
    return [a[:, :, :b.shape[2], :b.shape[3]].contiguous()]


@register_op("SpatialNarrowAsGradient")
def spatial_narrow_as_gradient(ctx, inputs):
    """(A, B, dC) -> dA: dC in the top-left corner, zeros elsewhere."""
    a, b, dc = inputs
    _narrow_check(ctx, a, b)
    da = torch.zeros_like(a)
    da[:, :, :dc.shape[2], :dc.shape[3]] = dc
    return [da]


# --- FPN: CollectAndDistributeFpnRpnProposals, CollectRpnProposals, DistributeFpnProposals -------

def _collect_setup(ctx):
    lo, hi = int(ctx.arg("rpn_min_level", 2)), int(ctx.arg("rpn_max_level", 6))
    levels = hi - lo + 1
    distribute = ctx.op.type == "CollectAndDistributeFpnRpnProposals"
    if len(ctx.input_names) != 2 * levels:
        raise ValueError(f"operator {ctx.op.type}: RPN levels {lo}..{hi} need {2 * levels} inputs "
                         f"(the rois of each level, then their probs), got "
                         f"{len(ctx.input_names)}")
    ctx.state["collect"] = (levels, int(ctx.arg("rpn_post_nms_topN", 2000)))
    if distribute:
        _distribute_setup(ctx, extra=1)


def _distribute_setup(ctx, extra=0):
    lo, hi = int(ctx.arg("roi_min_level", 2)), int(ctx.arg("roi_max_level", 5))
    if len(ctx.output_names) != hi - lo + 2 + extra:
        raise ValueError(f"operator {ctx.op.type}: RoI levels {lo}..{hi} need "
                         f"{hi - lo + 2 + extra} outputs, got {len(ctx.output_names)}")
    ctx.state["distribute"] = (lo, hi, float(ctx.arg("roi_canonical_scale", 224)),
                               float(ctx.arg("roi_canonical_level", 4)))


def _collect(ctx, inputs):
    """The rois of all levels, best rpn_post_nms_topN first (stable sort by score)."""
    levels, top = ctx.state["collect"]
    rois = torch.cat([r.reshape(-1, 5) for r in inputs[:levels]])
    scores = torch.cat([s.reshape(-1) for s in inputs[levels:]])
    if rois.shape[0] != scores.shape[0]:
        raise ValueError(f"operator {ctx.op.type}: {rois.shape[0]} rois but {scores.shape[0]} "
                         "probabilities")
    order = _sort_desc(scores)
    if 0 < top < order.numel():
        order = order[:top]
    return rois[order]


def _distribute(ctx, rois):
    """(rois of each level, rois_idx_restore): the FPN paper's level of each RoI by its size."""
    lo, hi, scale, level = ctx.state["distribute"]
    boxes = rois[:, 1:5].float()
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    if bool((area < 0).any()):
        raise ValueError(f"operator {ctx.op.type}: negative RoI areas")
    target = torch.floor(level + torch.log2(area.sqrt() / scale + 1e-6)).clamp(lo, hi)
    per_level, order = [], []
    for lvl in range(lo, hi + 1):
        idx = (target == lvl).nonzero().reshape(-1)
        per_level.append(rois[idx])
        order.append(idx)
    restore = torch.argsort(torch.cat(order)).int()
    return per_level, restore


@register_op("CollectAndDistributeFpnRpnProposals", gradient=NO_GRADIENT, setup=_collect_setup,
             data_dependent=True)
def collect_and_distribute_fpn_rpn_proposals(ctx, inputs):
    """(rpn_rois_fpnK..., rpn_roi_probs_fpnK...) -> (rois, rois_fpnL..., rois_idx_restore)."""
    rois = _collect(ctx, inputs)
    per_level, restore = _distribute(ctx, rois)
    return [rois] + per_level + [restore]


@register_op("CollectRpnProposals", gradient=NO_GRADIENT, setup=_collect_setup,
             data_dependent=True)
def collect_rpn_proposals(ctx, inputs):
    """(rpn_rois_fpnK..., rpn_roi_probs_fpnK...) -> rois: the best rpn_post_nms_topN of all."""
    return [_collect(ctx, inputs)]


@register_op("DistributeFpnProposals", gradient=NO_GRADIENT, setup=_distribute_setup,
             data_dependent=True)
def distribute_fpn_proposals(ctx, inputs):
    """rois -> (rois_fpnL..., rois_idx_restore): each RoI to the FPN level of its size."""
    per_level, restore = _distribute(ctx, inputs[0].reshape(-1, 5))
    return per_level + [restore]


# --- GroupSpatialSoftmax (RetinaNet) ------------------------------------------------------------

def _group_softmax_setup(ctx):
    ctx.state["num_classes"] = int(ctx.arg("num_classes", 81))


def _groups(ctx, x):
    k = ctx.state["num_classes"]
    if x.dim() != 4 or x.shape[1] % k:
        raise ValueError(f"operator {ctx.op.type}: scores must be (N, A·{k}, H, W), got "
                         f"{tuple(x.shape)}")
    n, c, h, w = x.shape
    return x.reshape(n, c // k, k, h, w)


def _group_softmax_grad(op, g_output):
    """GroupSpatialSoftmaxGradient(Y, dY) -> dX."""
    return [gradient_op(op, "GroupSpatialSoftmaxGradient", [op.output[0], g_output[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0])]


@register_op("GroupSpatialSoftmax", gradient=_group_softmax_grad, setup=_group_softmax_setup)
def group_spatial_softmax(ctx, inputs):
    """Softmax over each group of ``num_classes`` channels (one group per anchor), per pixel."""
    x = inputs[0]
    return [torch.softmax(_groups(ctx, x), 2).reshape(x.shape)]


@register_op("GroupSpatialSoftmaxGradient", setup=_group_softmax_setup)
def group_spatial_softmax_gradient(ctx, inputs):
    """(Y, dY) -> dX = Y·(dY − Σ_group dY·Y)."""
    y, dy = _groups(ctx, inputs[0]), _groups(ctx, inputs[1])
    return [(y * (dy - (dy * y).sum(2, keepdim=True))).reshape(inputs[0].shape)]


# --- PSRoIPool (R-FCN) --------------------------------------------------------------------------

def _ps_setup(ctx):
    scale, group, dim = (float(ctx.arg("spatial_scale", 1.0)), int(ctx.arg("group_size", 1)),
                         int(ctx.arg("output_dim", 1)))
    if scale <= 0 or group < 1 or dim < 1:
        raise ValueError(f"operator {ctx.op.type}: spatial_scale, group_size and output_dim must "
                         f"be positive, got {scale}, {group}, {dim}")
    ctx.state["ps"] = (scale, group, dim)


def ps_roi_pool(state, x, rois):
    """(Y [R, output_dim, G, G], mapping_channel): position-sensitive average RoI pooling."""
    scale, group, dim = state
    n, c, h, w = x.shape
    if c != dim * group * group:
        raise ValueError(f"operator PSRoIPool: X has {c} channels; output_dim·group_size² = "
                         f"{dim * group * group} expected")
    batch, boxes = _roi_boxes(rois, "PSRoIPool")
    r = boxes.shape[0]
    b32 = boxes.float()
    # float32 arithmetic, as the R-FCN kernel: rounded corners, ends one pixel past x2/y2.
    start = _round(b32[:, :2]).float() * scale
    end = (_round(b32[:, 2:]).float() + 1.0) * scale
    size = (end - start).clamp(min=0.1)
    bin_w, bin_h = size[:, 0] / group, size[:, 1] / group
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    y = x.new_zeros((r, dim, group, group))
    mapping = torch.empty((r, dim, group, group), dtype=torch.int32, device=x.device)
    tops = torch.arange(dim, device=x.device)
    for i in range(group):
        h0 = torch.floor(i * bin_h + start[:, 1]).long().clamp(0, h)
        h1 = torch.ceil((i + 1) * bin_h + start[:, 1]).long().clamp(0, h)
        in_h = (ys >= h0[:, None]) & (ys < h1[:, None])
        for j in range(group):
            w0 = torch.floor(j * bin_w + start[:, 0]).long().clamp(0, w)
            w1 = torch.ceil((j + 1) * bin_w + start[:, 0]).long().clamp(0, w)
            in_w = (xs >= w0[:, None]) & (xs < w1[:, None])
            mask = (in_h[:, :, None] & in_w[:, None, :]).to(x.dtype)  # (R, H, W)
            channels = (tops * group + i) * group + j
            feats = x[batch[:, None], channels[None, :]]  # (R, dim, H, W)
            area = ((h1 - h0) * (w1 - w0)).clamp(min=0).to(x.dtype)
            total = (feats * mask[:, None]).sum((2, 3))
            y[:, :, i, j] = torch.where(area[:, None] > 0, total / area.clamp(min=1)[:, None],
                                        torch.zeros_like(total))
            mapping[:, :, i, j] = channels.int()
    return y, mapping


def _ps_grad(op, g_output):
    """PSRoIPoolGradient(X, RoIs, mapping_channel, dY) -> dX."""
    if len(op.output) < 2:
        raise ValueError("the gradient of PSRoIPool needs its mapping_channel output: give "
                         "PSRoIPool two outputs (Y, mapping_channel)")
    return [gradient_op(op, "PSRoIPoolGradient", [op.input[0], op.input[1], op.output[1],
                                                  g_output[0]], [grad_name(op.input[0])])], \
        [grad_name(op.input[0]), None]


@register_op("PSRoIPool", gradient=_ps_grad, setup=_ps_setup)
def ps_roi_pool_op(ctx, inputs):
    """(X [N, dim·G², H, W], RoIs [R, 5]) -> (Y [R, dim, G, G], mapping_channel) (R-FCN)."""
    return list(ps_roi_pool(ctx.state["ps"], *inputs))[:max(1, len(ctx.output_names))]


@register_op("PSRoIPoolGradient", setup=_ps_setup)
def ps_roi_pool_gradient(ctx, inputs):
    """(X, RoIs, mapping_channel, dY) -> dX: each bin's gradient spread evenly over the bin."""
    x, rois, _, dy = inputs
    return vjp(lambda t: ps_roi_pool(ctx.state["ps"], t, rois)[0], [x], [0], [dy])


# --- SampleAs (Mask R-CNN) ----------------------------------------------------------------------

def _sample_as_grad(op, g_output):
    """SampleAsGradient(X, labels, dY) -> dX."""
    return [gradient_op(op, "SampleAsGradient", [op.input[0], op.input[1], g_output[0]],
                        [grad_name(op.input[0])])], [grad_name(op.input[0]), None]


def _sample_rows(ctx, x, labels):
    labels = labels.reshape(-1)
    if labels.numel() != x.shape[0]:
        raise ValueError(f"operator {ctx.op.type}: {labels.numel()} labels for {x.shape[0]} rows")
    return (labels > 0).to(x.device)


@register_op("SampleAs", gradient=_sample_as_grad, data_dependent=True)
def sample_as(ctx, inputs):
    """Y = the rows of X whose label is > 0."""
    x, labels = inputs
    return [x[_sample_rows(ctx, x, labels)]]


@register_op("SampleAsGradient")
def sample_as_gradient(ctx, inputs):
    """(X, labels, dY) -> dX: dY in the selected rows, zeros elsewhere."""
    x, labels, dy = inputs
    dx = torch.zeros_like(x)
    dx[_sample_rows(ctx, x, labels)] = dy.to(dx.dtype)
    return [dx]
