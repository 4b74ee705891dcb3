"""Concept datasets: protocol, registry and the built-in kinds.

Kinds (``create_dataset(kind, **params)``): ``synthetic`` (the procedural world, the default),
``broden`` (the Broden layout), ``cub`` (CUB-200-2011 part landmarks), ``imagefolder`` (plain
``root/<class>/<image>`` folders). Tools: ``export_broden`` (any dataset → Broden layout),
``contact_sheet`` (a preview PNG with mask overlays), and the CLI helpers ``export_command`` /
``preview_command``.

Layering: this package imports only :mod:`repdissect.core` (its error base and the dataset-factory hook it
fills, so a running stage's ``ctx.dataset()`` can build a dataset without the core importing this package).
"""

from ._base import Batch, Concept, ConceptDataset, DatasetError, create_dataset, list_datasets, register_dataset
from ._commands import export_command, preview_command
from .broden import BrodenDataset, export_broden
from .cub import CUBDataset
from .imagefolder import ImageFolderDataset
from .preview import contact_sheet
from .synthetic import SyntheticWorld
from ..core import set_dataset_factory

set_dataset_factory(create_dataset)

__all__ = [
    "Batch",
    "BrodenDataset",
    "CUBDataset",
    "Concept",
    "ConceptDataset",
    "DatasetError",
    "ImageFolderDataset",
    "SyntheticWorld",
    "contact_sheet",
    "create_dataset",
    "export_broden",
    "export_command",
    "list_datasets",
    "preview_command",
    "register_dataset",
]
