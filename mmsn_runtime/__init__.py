"""mmsn_runtime: the plain modules that models collapsed by
``tools/deploy/collapse_norms.py`` (and the SSN ResNet) need at run time.

It depends on torch, mmengine and mmpretrain only, never on mmsn, so a
collapsed model loads and runs with ``custom_imports=dict(
imports=['mmsn_runtime'])`` and no Switchable Normalization code:

* :class:`CollapsedNorm` (``'CollapsedNorm'`` in MMEngine's root
  ``MODELS``): the one normalization an SSN/SN layer picked, IN, LN or BN
  statistics for the mean and for the variance (all nine combinations);
* :class:`ResNetStemPool` (``'ResNetStemPool'`` in mmpretrain's ``MODELS``):
  mmpretrain's ResNet with configurable stem max-pool arguments (the SSN
  authors' ResNet pools with kernel 3, stride 2, padding 0, ceil_mode);
* :func:`expose_batch_norms`: turns the layers that picked BN for both into
  ``nn.BatchNorm2d``, so that mmcv's ``fuse_conv_bn`` folds them into the
  preceding convolutions.
"""
from .collapsed_norm import BRANCHES, CollapsedNorm, expose_batch_norms
from .resnet_stem_pool import ResNetStemPool

__all__ = ['CollapsedNorm', 'BRANCHES', 'expose_batch_norms', 'ResNetStemPool']
