"""Concept datasets: protocol, registry and the built-in kinds."""

from ._base import Batch, Concept, ConceptDataset, DatasetError, create_dataset, list_datasets, register_dataset

__all__ = ["Batch", "Concept", "ConceptDataset", "DatasetError", "create_dataset", "list_datasets", "register_dataset"]
