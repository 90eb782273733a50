"""Datasets, registered in mmpretrain's DATASETS."""
