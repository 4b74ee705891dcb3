"""Seeing what a unit or a class looks for: activation maximisation, class models, deep dream, filters, t-SNE.

Pure functions on a network (``NormalizedModel``: uint8-range RGB in) or on arrays; the pipeline stages that
cache them (``activation_max``, ``filters``, ``tsne``; ``dataset_search`` lives with the top-k statistic) are
declared in ``repdissect.stages``. References: Simonyan et al. 2014; Yosinski et al. 2015; Olah et al.,
Distill 2017; Mordvintsev et al. 2015; van der Maaten & Hinton 2008.
"""

from ._activation_max import AMResult, AMSettings, activation_maximisation, layer_output
from ._dream import deep_dream
from ._filters import filter_grid, first_conv
from ._param import COLOR_CORRELATION_SQRT, ImageParam
from ._tsne import OPENTSNE_FROM, opentsne_available, tsne_embedding

__all__ = ["AMResult", "AMSettings", "activation_maximisation", "layer_output", "deep_dream", "filter_grid",
           "first_conv", "COLOR_CORRELATION_SQRT", "ImageParam", "OPENTSNE_FROM", "opentsne_available",
           "tsne_embedding"]
