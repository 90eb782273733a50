from .group_clip_constructor import GroupClipOptimWrapperConstructor

__all__ = ['GroupClipOptimWrapperConstructor']
