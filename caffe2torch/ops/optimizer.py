"""Optimizer ops: LearningRate, MomentumSGD(Update), Adam, Adagrad, RmsProp, Ftrl, their sparse
forms, ScatterWeightedSum and ScatterAssign (Caffe2's ``caffe2/sgd``).

The update formulas are Caffe2's kernels', in its sign convention: the ``lr`` input is the
LearningRate blob, which ``optimizer.build_*`` makes negative for descent (Adam, Adagrad,
WeightedSum: ``w + lr·step``) and positive for MomentumSGDUpdate (``w − step``). Outputs are
new tensors stored under the output names, so updating in place (``Adam([w, m1, m2, g, lr,
it], [w, m1, m2])``, what the optimizers build) and writing elsewhere both work. The sparse
forms update the rows named by ``indices`` one index after the other, as Caffe2's CPU loops
do, so repeated indices accumulate. None of these ops has a gradient.
"""
import math

import numpy as np
import torch

from caffe2torch.ops.registry import NO_GRADIENT, register_op


def _scalar(ctx, x, like, what="lr"):
    """The one-element input ``x`` as a 0-d tensor in ``like``'s dtype (no host sync)."""
    if x.numel() != 1:
        raise ValueError(f"operator {ctx.op.type}: {what} input {ctx.input_names[1]!r} must hold "
                         f"one value, got shape {tuple(x.shape)}")
    return x.reshape(()).to(like.dtype)


def _farg(ctx, name, default):
    """A float argument as Caffe2 reads it: a C++ float (Argument.f and the defaults alike)."""
    return float(np.float32(ctx.arg(name, default)))


def _check_outputs(ctx, low, high):
    n = len(ctx.output_names)
    if not low <= n <= high:
        raise ValueError(f"operator {ctx.op.type} takes {low}" + (f" to {high}" if high > low
                         else "") + f" outputs, got {n}")


def _rows(indices):
    """Indices as a 1-D int64 tensor, and whether they repeat (then rows update one by one)."""
    idx = indices.reshape(-1).long()
    return idx, idx.numel() != torch.unique(idx).numel()


# --- LearningRate -------------------------------------------------------------------------------

def _f32(x):
    return np.float32(x)


def _functor(policy, arg, prefix, base_lr):
    """f(iter) of one Caffe2 policy; arguments are read with ``prefix`` (composite's sub-policies).

    Caffe2 computes the rate in float32 (its functors are templated on T=float), so we do too:
    the rates, and so the training trajectories, match Caffe2's bit for bit.
    """
    def a(name, default=None):
        return arg(prefix + name, default)

    f32, one = _f32, _f32(1.0)
    if policy == "fixed":
        return lambda it: one
    if policy == "step":
        stepsize = a("stepsize")
        if stepsize is None:
            _need(prefix + "stepsize")
        stepsize = int(stepsize)
        gamma = f32(a("gamma", 0.0))
        if stepsize <= 0:
            raise ValueError(f"LearningRate policy 'step' needs stepsize > 0, got {stepsize}")
        return lambda it: gamma ** f32(it // stepsize)
    if policy == "exp":
        gamma = f32(a("gamma", 0.0))
        return lambda it: gamma ** f32(it)
    if policy == "gate":
        m1, m2, n = f32(a("multiplier_1", 1.0)), f32(a("multiplier_2", 1.0)), int(a("num_iter", 0))
        return lambda it: m2 if it >= n else m1
    if policy == "inv":
        gamma, power = f32(a("gamma", 0.0)), f32(a("power", 0.0))
        return lambda it: (one + gamma * f32(it)) ** -power
    if policy == "poly":
        max_iter = a("max_iter")
        if max_iter is None:
            _need(prefix + "max_iter")
        max_iter, power = f32(max_iter), f32(a("power", 0.0))
        # Past max_iter the base would go negative; the rate stays 0 there.
        return lambda it: max(one - f32(it) / max_iter, f32(0.0)) ** power
    if policy == "linearWarmup":
        start, n = f32(a("start_multiplier", 0.0)), int(a("num_iter", 0))
        return lambda it: start + (one - start) * f32(it) / f32(n) if it < n else one
    if policy == "constantWarmup":
        m, n = f32(a("multiplier", 0.5)), int(a("num_iter", 0))
        return lambda it: m if it < n else one
    if policy == "pieceWarmup":
        m1, n1, m2 = f32(a("m1", 0.5)), int(a("n1", 0)), f32(a("m2", 0.5))
        n2, m3 = int(a("n2", 0)), f32(a("m3", 0.5))
        return lambda it: m1 if it < n1 else (m2 if it < n2 else m3)
    if policy == "alter":
        first = bool(a("active_first", True))
        on, off = int(a("active_period", -1)), int(a("inactive_period", -1))
        if on < 0 or off < 0:
            raise ValueError("LearningRate policy 'alter' needs active_period and inactive_period")
        return lambda it: (one if first else f32(0.0)) if it % (on + off) < (on if first else off) \
            else (f32(0.0) if first else one)
    if policy == "hill":
        n = int(a("num_iter", 0))
        warm = _functor("linearWarmup", arg, prefix, base_lr)
        inv = _functor("inv", arg, prefix, base_lr)
        end = f32(a("end_multiplier", 0.0))
        return lambda it: warm(it) if it < n else max(end, inv(it - n))
    if policy == "cyclical":
        max_lr, stepsize = f32(a("max_lr", 0.005)), int(a("stepsize", 0))
        decay = f32(a("decay", 1.0))
        if stepsize <= 0:
            raise ValueError("LearningRate policy 'cyclical' needs stepsize > 0")
        return _cyclical(base_lr, max_lr, stepsize, decay)
    if policy == "cosine":
        return _cosine(f32(a("min_lr", 0.1)), f32(a("max_lr", 0.5)), int(a("period", 50)),
                       f32(a("t_mult", 1.0)), f32(a("lr_shrink", 0.99)))
    if policy in ("constantThenLinearWarmup", "compositeCosine", "compositeCyclical"):
        start = f32(a("start_warmup_multiplier", 0.1))
        n_const = int(a("constant_warmup_num_iter", 10000000))
        n_lin = int(a("linear_warmup_num_iter", 10000000))

        def warmup(it):
            if it < n_const:
                return start
            if it < n_const + n_lin:
                return start + (one - start) * f32(it - n_const) / f32(n_lin)
            return one
        if policy == "constantThenLinearWarmup":
            return warmup
        if policy == "compositeCosine":
            after = _cosine(f32(a("cosine_min_lr", 0.1)), f32(a("cosine_max_lr", 0.5)),
                            int(a("cosine_period", 50)), f32(a("cosine_t_mult", 1.0)),
                            f32(a("cosine_lr_shrink", 0.99)))
        else:
            after = _cyclical(base_lr, f32(a("cyclical_max_lr", 0.05)),
                              int(a("cyclical_step_size", 1000000)), f32(a("cyclical_decay", 1.0)))
        return lambda it: warmup(it) if it < n_const + n_lin else after(it - n_const - n_lin)
    if policy == "composite":
        if prefix:
            raise ValueError("LearningRate: a composite policy cannot be a sub-policy of composite")
        return _composite(arg, base_lr)
    raise ValueError(f"LearningRate: unknown policy {policy!r}; caffe2torch supports "
                     f"{', '.join(POLICIES)} (Caffe2 never had 'multistep')")


POLICIES = ("fixed", "step", "exp", "inv", "poly", "gate", "linearWarmup", "constantWarmup",
            "pieceWarmup", "alter", "hill", "cyclical", "cosine", "constantThenLinearWarmup",
            "compositeCosine", "compositeCyclical", "composite")


def _need(name):
    raise ValueError(f"operator LearningRate needs argument {name!r}")


def _cyclical(base_lr, max_lr, stepsize, decay):
    f32 = _f32

    def f(it):
        cycle = it // (2 * stepsize) + 1
        x = abs(f32(it) / f32(stepsize) - f32(2 * cycle) + f32(1.0))
        return f32(1.0) + (abs(max_lr) / abs(base_lr) - f32(1.0)) * max(f32(0.0), f32(1.0) - x) \
            * decay ** f32(it // (2 * stepsize))
    return f


def _cosine(min_lr, max_lr, period, t_mult, lr_shrink):
    def f(it):
        if t_mult != 1.0:
            i = math.floor(math.log(1 - it / period * (1.0 - t_mult)) / math.log(t_mult))
            t_i = t_mult ** i * period
            t_curr = it - (1.0 - t_mult ** i) / (1.0 - t_mult) * period
        else:
            i = math.floor(it / period)
            t_i = period
            t_curr = it - t_i * i
        shrink = float(lr_shrink) ** i
        lo, hi = float(min_lr) * shrink, float(max_lr) * shrink
        return _f32(lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t_curr / t_i)))
    return f


def _composite(arg, base_lr):
    num_iters = arg("sub_policy_num_iters", None)
    if not num_iters:
        raise ValueError("LearningRate policy 'composite' needs sub_policy_num_iters (a list of "
                         "positive iteration counts) and sub_policy_<i>_policy for each")
    starts, parts = [], []
    start = 1  # Caffe2's first sub-policy covers iterations 1 .. num_iters[0]
    for i, n in enumerate(num_iters):
        if int(n) <= 0:
            raise ValueError("LearningRate composite: every sub_policy_num_iters must be > 0")
        prefix = f"sub_policy_{i}_"
        sub = arg(prefix + "policy", None)
        if sub is None:
            raise ValueError(f"LearningRate composite: needs argument {prefix + 'policy'!r}")
        parts.append((_functor(sub, arg, prefix, base_lr), _f32(arg(prefix + "lr_scale", 1.0))))
        starts.append(start)
        start += int(n)

    def f(it):
        k = max(0, np.searchsorted(starts, it, side="right") - 1)
        fn, scale = parts[k]
        return fn(it) * scale  # the sub-policy sees the global iteration, as in Caffe2
    return f


def _lr_setup(ctx):
    base_lr = _f32(ctx.require("base_lr"))
    policy = ctx.require("policy")
    ctx.state["lr"] = (base_lr, _functor(policy, ctx.arg, "", base_lr))


@register_op("LearningRate", gradient=NO_GRADIENT, setup=_lr_setup, cpu_only_inputs=True)
def learning_rate(ctx, inputs):
    """lr = base_lr · f(iter) as a 0-d float on the op's device (fixed, step, ... composite)."""
    base_lr, policy = ctx.state["lr"]
    it = int(inputs[0].reshape(()).item())  # the counter lives on CPU: no device sync
    # torch.full launches a fill kernel: no host-to-device copy that would wait for the GPU.
    return [torch.full((), float(base_lr * policy(it)), dtype=torch.float32, device=ctx.device)]


# --- MomentumSGD --------------------------------------------------------------------------------

def _momentum_step(ctx, grad, moment, lr):
    """(adjusted gradient, new moment) of Caffe2's momentum kernel."""
    mu = _farg(ctx, "momentum", 0.0)
    lr = _scalar(ctx, lr, grad)
    if not ctx.arg("nesterov", 0):
        adjusted = lr * grad + mu * moment
        return adjusted, adjusted
    new_moment = mu * moment + lr * grad
    return (1 + mu) * new_moment - mu * moment, new_moment


@register_op("MomentumSGD", gradient=NO_GRADIENT)
def momentum_sgd(ctx, inputs):
    """(grad, moment, lr) -> (grad', moment'): grad' = lr·grad + momentum·moment (or nesterov)."""
    grad, moment, lr = inputs
    adjusted, new_moment = _momentum_step(ctx, grad, moment, lr)
    return [adjusted, new_moment]


@register_op("MomentumSGDUpdate", gradient=NO_GRADIENT)
def momentum_sgd_update(ctx, inputs):
    """(grad, moment, lr, param) -> (grad', moment', param − grad'), MomentumSGD's step applied."""
    grad, moment, lr, param = inputs
    adjusted, new_moment = _momentum_step(ctx, grad, moment, lr)
    return [adjusted, new_moment, param - adjusted]


@register_op("SparseMomentumSGDUpdate", gradient=NO_GRADIENT)
def sparse_momentum_sgd_update(ctx, inputs):
    """(grad, moment, lr, param, indices) -> (grad', moment', param): the rows in indices only."""
    grad, moment, lr, param, indices = inputs
    idx, _ = _rows(indices)
    moment, param = moment.clone(), param.clone()
    rows = grad.reshape(idx.numel(), -1)
    out_grad = torch.empty_like(rows)
    m2, p2 = moment.reshape(moment.shape[0], -1), param.reshape(param.shape[0], -1)
    for i, row in enumerate(idx.tolist()):
        adjusted, new_m = _momentum_step(ctx, rows[i], m2[row], lr)
        m2[row] = new_m
        p2[row] -= adjusted
        out_grad[i] = adjusted
    return [out_grad.reshape(grad.shape), moment, param]


# --- Adam ---------------------------------------------------------------------------------------

def _adam_args(ctx, iteration, like):
    beta1, beta2 = _farg(ctx, "beta1", 0.9), _farg(ctx, "beta2", 0.999)
    eps = _farg(ctx, "epsilon", 1e-5)
    # t = iter + 1; Caffe2 computes the correction in double and uses it as a float.
    t = iteration.reshape(()).to(device=like.device, dtype=torch.float64) + 1
    correction = torch.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
    return beta1, beta2, eps, correction.to(like.dtype)


def _adam_setup(ctx):
    _check_outputs(ctx, 3, 4)


@register_op("Adam", gradient=NO_GRADIENT, setup=_adam_setup)
def adam(ctx, inputs):
    """(param, m1, m2, grad, lr, iter) -> (param', m1', m2'[, step]), Caffe2's Adam (t = iter+1)."""
    param, m1, m2, grad, lr, iteration = inputs
    beta1, beta2, eps, correction = _adam_args(ctx, iteration, param)
    lr = _scalar(ctx, lr, param)
    new_m1 = m1 * beta1 + grad * (1 - beta1)
    new_m2 = m2 * beta2 + grad * grad * (1 - beta2)
    step = correction * new_m1 / (torch.sqrt(new_m2) + eps)
    outputs = [param + lr * step, new_m1, new_m2]
    return outputs + [step] if len(ctx.output_names) == 4 else outputs


@register_op("SparseAdam", gradient=NO_GRADIENT, setup=_adam_setup)
def sparse_adam(ctx, inputs):
    """(param, m1, m2, indices, grad, lr, iter) -> (param', m1', m2'): Adam on the indexed rows."""
    param, m1, m2, indices, grad, lr, iteration = inputs
    beta1, beta2, eps, correction = _adam_args(ctx, iteration, param)
    lr = _scalar(ctx, lr, param)
    idx, _ = _rows(indices)
    param, m1, m2 = param.clone(), m1.clone(), m2.clone()
    p2, a2, b2 = (t.reshape(t.shape[0], -1) for t in (param, m1, m2))
    rows = grad.reshape(idx.numel(), -1)
    steps = []
    for i, row in enumerate(idx.tolist()):
        a2[row] = a2[row] * beta1 + rows[i] * (1 - beta1)
        b2[row] = b2[row] * beta2 + rows[i] * rows[i] * (1 - beta2)
        step = correction * a2[row] / (torch.sqrt(b2[row]) + eps)
        p2[row] += lr * step
        steps.append(step)
    outputs = [param, m1, m2]
    if len(ctx.output_names) == 4:
        outputs.append(torch.stack(steps).reshape(grad.shape) if steps else grad.clone())
    return outputs


# --- Adagrad ------------------------------------------------------------------------------------

def _adagrad_setup(ctx):
    _check_outputs(ctx, 2, 2)


@register_op("Adagrad", gradient=NO_GRADIENT, setup=_adagrad_setup)
def adagrad(ctx, inputs):
    """(param, moment, grad, lr) -> (param', moment'): h = decay·h + g², w += lr·g/(√h + ε)."""
    param, moment, grad, lr = inputs
    eps, decay = _farg(ctx, "epsilon", 1e-5), _farg(ctx, "decay", 1.0)
    new_moment = decay * moment + grad * grad
    return [param + _scalar(ctx, lr, param) * grad / (torch.sqrt(new_moment) + eps), new_moment]


@register_op("SparseAdagrad", gradient=NO_GRADIENT, setup=_adagrad_setup)
def sparse_adagrad(ctx, inputs):
    """(param, moment, indices, grad, lr) -> (param', moment'): Adagrad on the indexed rows."""
    param, moment, indices, grad, lr = inputs
    eps = _farg(ctx, "epsilon", 1e-5)
    lr = _scalar(ctx, lr, param)
    idx, repeated = _rows(indices)
    param, moment = param.clone(), moment.clone()
    p2, h2 = param.reshape(param.shape[0], -1), moment.reshape(moment.shape[0], -1)
    rows = grad.reshape(idx.numel(), -1)
    if not repeated:  # one vectorized pass; repeated rows need Caffe2's one-by-one order
        h2[idx] = h2[idx] + rows * rows
        p2[idx] = p2[idx] + lr * rows / (torch.sqrt(h2[idx]) + eps)
        return [param, moment]
    for i, row in enumerate(idx.tolist()):
        h2[row] += rows[i] * rows[i]
        p2[row] += lr * rows[i] / (torch.sqrt(h2[row]) + eps)
    return [param, moment]


# --- RmsProp ------------------------------------------------------------------------------------

@register_op("RmsProp", gradient=NO_GRADIENT)
def rms_prop(ctx, inputs):
    """(g, ms, mom, lr) -> (g', ms', mom'): ms += (1−decay)(g²−ms), mom = μ·mom + lr·g/√(ε+ms)."""
    grad, ms, mom, lr = inputs
    decay, mu = _farg(ctx, "decay", 0.9), _farg(ctx, "momentum", 0.0)
    eps = _farg(ctx, "epsilon", 1e-5)
    new_ms = ms + (1 - decay) * (grad * grad - ms)
    new_mom = mom * mu + _scalar(ctx, lr, grad) * grad / torch.sqrt(eps + new_ms)
    return [new_mom, new_ms, new_mom]


# --- Ftrl ---------------------------------------------------------------------------------------

def _ftrl(ctx, w, n, z, g, alpha_input):
    """Caffe2's ftrl_compute on tensors: (new w, new n, new z)."""
    beta = _farg(ctx, "beta", 1.0)
    lambda1, lambda2 = _farg(ctx, "lambda1", 0.001), _farg(ctx, "lambda2", 0.001)
    if alpha_input is not None:
        alpha_inv = 1.0 / _scalar(ctx, alpha_input, w, "alpha")
    else:
        alpha_inv = 1.0 / _farg(ctx, "alpha", 0.005)
    new_n = n + g * g
    sigma = (torch.sqrt(new_n) - torch.sqrt(n)) * alpha_inv
    new_z = z + g - sigma * w
    denominator = (beta + torch.sqrt(new_n)) * alpha_inv + lambda2
    new_w = (lambda1 * torch.sign(new_z) - new_z) / denominator
    return torch.where(new_z.abs() > lambda1, new_w, torch.zeros_like(new_w)), new_n, new_z


def _check_nz(ctx, param, nz):
    if tuple(nz.shape) != tuple(param.shape) + (2,) and nz.numel() != 2 * param.numel():
        raise ValueError(f"operator {ctx.op.type}: n_z {ctx.input_names[1]!r} must hold two values "
                         f"per parameter (shape {tuple(param.shape) + (2,)}), got "
                         f"{tuple(nz.shape)}; make it with ConstantFill([param], extra_shape=[2])")


@register_op("Ftrl", gradient=NO_GRADIENT)
def ftrl(ctx, inputs):
    """(param, n_z, grad[, alpha]) -> (param', n_z'): FTRL-proximal, n and z interleaved in n_z."""
    param, nz, grad = inputs[:3]
    _check_nz(ctx, param, nz)
    pairs = nz.reshape(-1, 2)
    w, n, z = _ftrl(ctx, param.reshape(-1), pairs[:, 0], pairs[:, 1], grad.reshape(-1),
                    inputs[3] if len(inputs) > 3 else None)
    return [w.reshape(param.shape), torch.stack([n, z], dim=1).reshape(nz.shape)]


@register_op("SparseFtrl", gradient=NO_GRADIENT)
def sparse_ftrl(ctx, inputs):
    """(param, n_z, indices, grad[, alpha]) -> (param', n_z'): Ftrl on the indexed rows."""
    param, nz, indices, grad = inputs[:4]
    _check_nz(ctx, param, nz)
    alpha = inputs[4] if len(inputs) > 4 else None
    idx, _ = _rows(indices)
    param, nz = param.clone(), nz.clone()
    p2 = param.reshape(param.shape[0], -1)
    nz2 = nz.reshape(param.shape[0], -1, 2)
    rows = grad.reshape(idx.numel(), -1)
    for i, row in enumerate(idx.tolist()):
        w, n, z = _ftrl(ctx, p2[row], nz2[row, :, 0], nz2[row, :, 1], rows[i], alpha)
        p2[row], nz2[row, :, 0], nz2[row, :, 1] = w, n, z
    return [param, nz]


# --- ScatterWeightedSum, ScatterAssign ----------------------------------------------------------

def _scatter_weighted_sum_setup(ctx):
    n = len(ctx.input_names)
    if n < 5 or n % 2 == 0:
        raise ValueError(f"operator ScatterWeightedSum takes X0, W0, INDICES, X1, W1[, X2, W2 ...]"
                         f"; got {n} inputs")
    if ctx.output_names != ctx.input_names[:1]:
        raise ValueError("operator ScatterWeightedSum works in place: its output must be X0 "
                         f"{ctx.input_names[0]!r}")


@register_op("ScatterWeightedSum", gradient=NO_GRADIENT, setup=_scatter_weighted_sum_setup)
def scatter_weighted_sum(ctx, inputs):
    """X0[INDICES[i]] = W0·X0[INDICES[i]] + Σ Wk·Xk[i] (in place; repeated indices in turn)."""
    x0, w0, indices = inputs[:3]
    idx, repeated = _rows(indices)
    x2 = x0.reshape(x0.shape[0], -1)
    w0 = _scalar(ctx, w0, x0, "W0")
    total = torch.zeros((idx.numel(), x2.shape[1]), dtype=x0.dtype, device=x0.device)
    for k in range(3, len(inputs), 2):
        total += inputs[k].reshape(idx.numel(), -1) * _scalar(ctx, inputs[k + 1], x0, f"W{k // 2}")
    if not repeated:
        x2[idx] = x2[idx] * w0 + total
    else:
        for i, row in enumerate(idx.tolist()):
            x2[row] = x2[row] * w0 + total[i]
    return [x0]


def _scatter_assign_setup(ctx):
    if ctx.output_names != ctx.input_names[:1]:
        raise ValueError("operator ScatterAssign works in place: its output must be DATA "
                         f"{ctx.input_names[0]!r}")


@register_op("ScatterAssign", gradient=NO_GRADIENT, setup=_scatter_assign_setup)
def scatter_assign(ctx, inputs):
    """DATA[INDICES[i]] = SLICES[i] (in place; for a repeated index the last slice wins)."""
    data, indices, slices = inputs
    idx, repeated = _rows(indices)
    rows = slices.reshape((idx.numel(),) + tuple(data.shape[1:])).to(data.dtype)
    if repeated:  # keep each index's last slice, as Caffe2's sequential loop leaves it
        last = {row: i for i, row in enumerate(idx.tolist())}
        keep = torch.tensor(sorted(last.values()), dtype=torch.long, device=idx.device)
        idx, rows = idx[keep], rows[keep]
    data[idx] = rows
    return [data]
