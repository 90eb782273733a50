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
    return _sparsemax(v, False)[0]


def _sparsemax(v: Tensor, with_jacobian: bool):
    num = v.shape[-1]
    ordered, order = v.sort(-1, descending=True)
    ranks = torch.arange(1, num + 1, device=v.device, dtype=v.dtype)
    cumulative = ordered.cumsum(-1)
    support_size = (1 + ranks * ordered > cumulative).sum(-1, keepdim=True)
    tau = (cumulative.gather(-1, support_size - 1) - 1) / support_size
    point = torch.relu(v - tau)
    if not with_jacobian:
        return point, None
    # d p_i / d v_j = [v_i > tau] (delta_ij - [j in the prefix] / size)
    rank = order.argsort(-1)
    in_prefix = (rank < support_size).to(v.dtype)
    active = (v - tau > 0).to(v.dtype)
    eye = torch.eye(num, dtype=v.dtype, device=v.device)
    jacobian = active.unsqueeze(-1) * (
        eye - (in_prefix / support_size).unsqueeze(-2))
    return point, jacobian


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
    return _sparsestmax(v, radius, False)[0]


def sparsestmax_jacobian(v: Tensor, radius):
    """:func:`sparsestmax` and its Jacobian ``d shares_i / d v_j`` (...,
    K, K), carried through every step instead of asked of autograd (which
    a kernel below autograd cannot use). The gradient of the shares is
    ``jacobian^T @ grad``."""
    return _sparsestmax(v, radius, True)


def _sparsestmax(v: Tensor, radius, with_jacobian: bool):
    if v.dim() == 0 or v.shape[-1] < 2:
        raise ValueError(f'sparsestmax needs at least 2 entries in the last '
                         f'dimension, got shape {tuple(v.shape)}')
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device)
    if radius.numel() == 1:
        radius = radius.reshape(())
    rad2 = radius.square().expand(v.shape[:-1]).unsqueeze(-1)
    point, jac = _sparsemax(v, with_jacobian)
    centre, size = _support_centre(point)
    done = size == 1
    one = torch.ones_like(rad2)
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    # Each round either finishes a row or shrinks its support by one.
    for _ in range(v.shape[-1] - 1):
        diff = point - centre
        # keep the push on the support's face: float rounding leaves diff a
        # component along (1, ..., 1) that would tilt it off the simplex
        diff = diff - centre * diff.sum(-1, keepdim=True)
        dist2 = diff.square().sum(-1, keepdim=True)
        settled = done | (dist2 >= rad2) | (dist2 == 0)
        # where() on both sides keeps the unused branch finite for autograd
        safe_dist2 = torch.where(settled, one, dist2)
        ratio = torch.where(settled, one, rad2 / safe_dist2)
        pushed = centre + diff * ratio.sqrt()
        left = ~settled & (pushed < 0).any(-1, keepdim=True)
        projected, jac_proj = _sparsemax(pushed, with_jacobian)
        new_centre, new_size = _support_centre(projected)
        if with_jacobian:
            # the centre and radius are constant where the support is:
            # d pushed = s (I - d d^T / |d|^2) (I - centre 1^T) d point
            jac_diff = (eye - centre.unsqueeze(-1)) @ jac
            jac_push = ratio.sqrt().unsqueeze(-1) * (
                eye - diff.unsqueeze(-1) * diff.unsqueeze(-2)
                / safe_dist2.unsqueeze(-1)) @ jac_diff
            jac = torch.where(
                settled.unsqueeze(-1), jac,
                torch.where(left.unsqueeze(-1), jac_proj @ jac_push,
                            jac_push))
        point = torch.where(settled, point,
                            torch.where(left, projected, pushed))
        rad2 = torch.where(
            left, rad2 - (new_centre - centre).square().sum(-1, keepdim=True),
            rad2)
        centre = torch.where(left, new_centre, centre)
        done = ~left | (new_size == 1)
    if with_jacobian:
        # clamp passes the gradient inside the closed interval
        inside = (point >= 0) & (point <= 1)
        jac = jac * inside.unsqueeze(-1).to(jac.dtype)
    return point.clamp(0, 1), jac


def one_hot_argmax(v: Tensor) -> Tensor:
    """The one-hot vector of each row's largest entry (the first of equal
    ones), in ``v``'s dtype; unlike ``F.one_hot`` it does not check the
    indices on the host."""
    ranks = torch.arange(v.shape[-1], device=v.device)
    return (ranks == v.argmax(-1, keepdim=True)).to(v.dtype)


def is_one_hot(shares: Tensor) -> Tensor:
    """Boolean (..., 1): whether each row of ``shares`` has one nonzero entry.
    """
    return (shares > 0).sum(-1, keepdim=True) == 1


@torch.no_grad()
def freeze_one_hot_(param: Tensor, flag: Tensor, grad, share: Tensor) -> None:
    """SSN's freeze of one importance vector: flag it (``flag``, a (1,)
    buffer) once its shares ``share`` are one-hot, and write the one-hot
    vector of the shares' largest entry into ``param`` while flagged; its
    ``grad`` (if any), accumulated before the freeze, must not move it and
    is zeroed."""
    fixed = flag.bool() | is_one_hot(share)
    param.copy_(torch.where(fixed, one_hot_argmax(share).to(param.dtype),
                            param))
    flag.copy_(fixed)
    if grad is not None:
        grad.masked_fill_(fixed, 0)


__all__ = [
    'sparsemax', 'sparsestmax', 'sparsestmax_jacobian', 'one_hot_argmax',
    'is_one_hot', 'freeze_one_hot_'
]
