"""SN-ready backbones, registered in mmpretrain's MODELS."""
