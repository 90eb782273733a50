"""Switchable Normalization written directly from the paper's equations and
the authors' numerics (unbiased IN variance, LN/BN statistics derived from the
IN statistics), independently of mmsn's implementation. Tests compare mmsn
against it."""
import torch


def instance_stats(x, unbiased):
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1)
    positions = xs.shape[2]
    mean_in = xs.sum(2) / positions
    squared_dev = ((xs - mean_in.unsqueeze(-1))**2).sum(2)
    # one position has variance 0 (the authors' code divides 0 by 0 there)
    denom = positions - 1 if unbiased and positions > 1 else positions
    return mean_in, squared_dev / denom


def batch_stats(x, unbiased):
    mean_in, var_in = instance_stats(x, unbiased)
    mean_bn = mean_in.mean(0)
    var_bn = (var_in + mean_in**2).mean(0) - mean_bn**2
    return mean_bn, var_bn


def reference_sn(x, gamma, beta, mean_logits, var_logits, running=None, *,
                 training=True, unbiased=True, eps=1e-5):
    """Returns the output and, in training with a BN branch, (mean_bn,
    var_bn) of this batch. ``running`` = (mean, var) used in eval; None means
    no BN branch."""
    n, c = x.shape[:2]
    mean_in, var_in = instance_stats(x, unbiased)
    second_in = var_in + mean_in**2
    mean_ln = mean_in.mean(1, keepdim=True).expand(n, c)
    var_ln = second_in.mean(1, keepdim=True).expand(n, c) - mean_ln**2
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    batch = None
    if running is not None:
        if training:
            mean_bn = mean_in.mean(0)
            var_bn = second_in.mean(0) - mean_bn**2
            batch = (mean_bn.detach(), var_bn.detach())
        else:
            mean_bn, var_bn = running
        means.append(mean_bn.expand(n, c))
        variances.append(var_bn.expand(n, c))
    w = torch.exp(mean_logits) / torch.exp(mean_logits).sum()
    v = torch.exp(var_logits) / torch.exp(var_logits).sum()
    mean = sum(wk * mk for wk, mk in zip(w, means))
    var = sum(vk * vk_ for vk, vk_ in zip(v, variances))
    shape = (n, c) + (1, ) * (x.dim() - 2)
    xhat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    affine_shape = (1, c) + (1, ) * (x.dim() - 2)
    y = xhat * gamma.view(affine_shape) + beta.view(affine_shape)
    return y, batch
