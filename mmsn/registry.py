"""What ``import mmsn`` registers, and where.

* SN and SSN layers (``SN``, ``SN1d``, ``SN2d``, ``SN3d``, ``SyncSN``,
  ``SSN``, ``SSN1d``, ``SSN2d``, ``SSN3d``, ``SyncSSN``): MMEngine's root
  ``MODELS``, so every OpenMMLab package's ``norm_cfg`` finds them
  (:mod:`mmsn.models.norms`).
* Hooks (``SNBatchAverageHook``, ``SNImportanceLoggerHook``,
  ``RNGStateHook``, ``SSNRadiusHook``): the root ``HOOKS``, and the optimizer
  wrapper constructor ``GroupClipOptimWrapperConstructor``
  (:mod:`mmsn.engine`).
* ``PreActResNet``, ``DropoutLinearClsHead``, ``ResNetStemPool``, the
  ``SklearnDigits`` dataset and the ``ToGrayscale`` transform build on
  mmpretrain or mmcv and live in mmpretrain's registries; importing
  mmpretrain takes seconds, so ``import mmsn`` does not. The root
  registries get, under each name, a builder that imports the real class on
  the first build (which registers it in mmpretrain's registry, where later
  look-ups find it) and builds it. A config with
  ``custom_imports=dict(imports=['mmsn'])`` therefore finds them in any
  scope; ``import mmsn.models.backbones`` (etc.) registers them at once.
"""
import importlib

from mmengine.registry import DATASETS, MODELS, TRANSFORMS

# name -> (root registry, module that defines and registers it)
LAZY = {
    'PreActResNet': (MODELS, 'mmsn.models.backbones.preact_resnet'),
    'DropoutLinearClsHead': (MODELS, 'mmsn.models.heads.dropout_linear_head'),
    'ResNetStemPool': (MODELS, 'mmsn_runtime.resnet_stem_pool'),
    'SklearnDigits': (DATASETS, 'mmsn.datasets.digits'),
    'ToGrayscale': (TRANSFORMS, 'mmsn.datasets.transforms'),
}


def _builder(name: str, module: str):

    def build(*args, **kwargs):
        cls = getattr(importlib.import_module(module), name)
        return cls(*args, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__module__ = module
    build.__doc__ = (f'Imports {module} (registering {name} in mmpretrain) '
                     f'and builds a {name}.')
    return build


for _name, (_registry, _module) in LAZY.items():
    if _name not in _registry.module_dict:
        _registry.register_module(name=_name, module=_builder(_name, _module))
