"""Datasets as in-memory uint8 arrays (`load_split`) and on-device augmentation (`kdjax.data.augment`)."""

from kdjax.data.sources import load_split
from kdjax.data.splits import ArraySplit

__all__ = ['ArraySplit', 'load_split']
