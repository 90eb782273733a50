"""SN layers with random, non-default state for tests: a dropped parameter
or buffer then changes the result."""
import torch


def randomize_(layer, seed=0, batches_tracked=None):
    """Give ``layer`` (any SN or SSN layer) random gamma and beta (if
    affine), importance logits and, with a BN branch, running statistics;
    ``batches_tracked``: also set ``num_batches_tracked``. Returns it."""
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g))
        layer.mean_weight.copy_(torch.randn(layer.mean_weight.shape,
                                            generator=g))
        layer.var_weight.copy_(torch.randn(layer.var_weight.shape,
                                           generator=g))
        if layer.using_bn:
            layer.running_mean.copy_(torch.randn(c, generator=g))
            layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if batches_tracked is not None:
                layer.num_batches_tracked.fill_(batches_tracked)
    return layer
