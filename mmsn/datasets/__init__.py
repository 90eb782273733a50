"""Datasets and transforms, registered in mmpretrain's registries."""
from .digits import SklearnDigits, digits_split
from .transforms import ToGrayscale

__all__ = ['SklearnDigits', 'digits_split', 'ToGrayscale']
