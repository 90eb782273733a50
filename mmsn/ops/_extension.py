"""Loading of the compiled CPU kernels (``mmsn._C``, the ``torch.ops.mmsn``
namespace).

The one place that knows how the kernels are obtained; the backends only ask
:func:`load_compiled_ops` for the op namespace.
"""
from typing import Optional, Tuple

import torch


def load_compiled_ops() -> Tuple[Optional[object], Optional[str]]:
    """``(torch.ops.mmsn, None)`` when the kernels load, else
    ``(None, reason)``."""
    try:
        from mmsn import _C  # noqa: F401  (registers torch.ops.mmsn)
    except ImportError as err:
        # not built, or built against another torch
        return None, f'{type(err).__name__}: {err}'
    return torch.ops.mmsn, None
