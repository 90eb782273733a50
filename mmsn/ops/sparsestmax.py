"""SparsestMax (Shao et al., "SSN: Learning Sparse Switchable Normalization
via SparsestMax", CVPR 2019): the map from SSN's importance parameters to
mixing shares that ends exactly one-hot.

``sparsestmax(v, r)`` first projects ``v`` onto the probability simplex
(sparsemax). A one-hot result is returned as is. Otherwise, with ``u`` the
uniform point of the current support, a point closer to ``u`` than ``r`` is
pushed out along ``w - u`` onto the circle of radius ``r`` around ``u``; if
that point leaves the simplex, the procedure repeats from it on the smaller
support that its projection has, with the radius of the circle where the
sphere meets that face, ``sqrt(r^2 - |u_new - u|^2)``. The result is clamped
to [0, 1]. As ``r`` grows to 1 (past the simplex's circumradius) every
result is a vertex.

Everything is written with fixed-size tensor ops (sorting, masks and
``torch.where`` over the K <= 3 entries, K - 1 unrolled rounds), so it is
batched over the leading dimensions, never reads a value back to the host,
and autograd differentiates it wherever the result is not one-hot (a
one-hot result has zero gradient). A point exactly at the centre has no
direction to be pushed in and is returned unchanged.
"""
import torch
from torch import Tensor


def sparsemax(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` (..., K) onto the simplex.

    The support is the prefix of the descending sort where
    ``1 + k * v_(k) > sum_{j <= k} v_(j)``; the threshold ``tau`` makes the
    support's entries ``v_i - tau`` sum to 1.
    """
    num = v.shape[-1]
    ordered = v.sort(-1, descending=True).values
    ranks = torch.arange(1, num + 1, device=v.device, dtype=v.dtype)
    cumulative = ordered.cumsum(-1)
    support_size = (1 + ranks * ordered > cumulative).sum(-1, keepdim=True)
    tau = (cumulative.gather(-1, support_size - 1) - 1) / support_size
    return torch.relu(v - tau)


def _support_centre(point: Tensor):
    """(centre, size): the uniform point of the support of ``point`` and the
    number of its entries."""
    support = point > 0
    size = support.sum(-1, keepdim=True)
    return support.to(point.dtype) / size, size


def sparsestmax(v: Tensor, radius) -> Tensor:
    """SparsestMax of each row of ``v`` (..., K) with the given radius.

    Args:
        v (Tensor): Importance parameters, K >= 2 in the last dimension
            (SSN: K = 3 for [IN, LN, BN], 2 without the BN branch).
        radius (float | Tensor): Radius of the circular constraint, a scalar
            or anything that broadcasts to ``v.shape[:-1]`` (SSN keeps it in
            a buffer of shape (1,)).

    Returns:
        Tensor: Shares on the simplex, of ``v``'s shape and dtype.
    """
    if v.dim() == 0 or v.shape[-1] < 2:
        raise ValueError(f'sparsestmax needs at least 2 entries in the last '
                         f'dimension, got shape {tuple(v.shape)}')
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device)
    if radius.numel() == 1:
        radius = radius.reshape(())
    rad2 = radius.square().expand(v.shape[:-1]).unsqueeze(-1)
    point = sparsemax(v)
    centre, size = _support_centre(point)
    done = size == 1
    one = torch.ones_like(rad2)
    # Each round either finishes a row or shrinks its support by one.
    for _ in range(v.shape[-1] - 1):
        diff = point - centre
        # keep the push on the support's face: float rounding leaves diff a
        # component along (1, ..., 1) that would tilt it off the simplex
        diff = diff - centre * diff.sum(-1, keepdim=True)
        dist2 = diff.square().sum(-1, keepdim=True)
        settled = done | (dist2 >= rad2) | (dist2 == 0)
        # where() on both sides keeps the unused branch finite for autograd
        ratio = torch.where(settled, one,
                            rad2 / torch.where(settled, one, dist2))
        pushed = centre + diff * ratio.sqrt()
        left = ~settled & (pushed < 0).any(-1, keepdim=True)
        projected = sparsemax(pushed)
        new_centre, new_size = _support_centre(projected)
        point = torch.where(settled, point,
                            torch.where(left, projected, pushed))
        rad2 = torch.where(
            left, rad2 - (new_centre - centre).square().sum(-1, keepdim=True),
            rad2)
        centre = torch.where(left, new_centre, centre)
        done = ~left | (new_size == 1)
    return point.clamp(0, 1)


def is_one_hot(shares: Tensor) -> Tensor:
    """Boolean (..., 1): whether each row of ``shares`` has one nonzero entry.
    """
    return (shares > 0).sum(-1, keepdim=True) == 1


__all__ = ['sparsemax', 'sparsestmax', 'is_one_hot']
