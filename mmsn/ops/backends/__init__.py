"""Implementations of the big-tensor passes of SN (see :mod:`.base`)."""
