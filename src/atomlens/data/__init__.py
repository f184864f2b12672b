"""Data: the batch structure, packed datasets, neighbour pairs, sources, splits, statistics."""

from .batch import Batch
from .dataset import BatchSampler, DataError, PackedDataset, make_loader
from .neighbors import molecular_pairs

__all__ = ["Batch", "BatchSampler", "DataError", "PackedDataset", "make_loader", "molecular_pairs"]
