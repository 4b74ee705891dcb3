"""Attribution methods on plain modules and tensors: saliency, SmoothGrad, guided backprop, deconvnet,
occlusion, CAM, Grad-CAM, guided Grad-CAM, LRP (ε, z⁺, αβ) and LIME (grid or SLIC superpixels) — for a class or for every unit of a layer.

Every method takes a model in ``eval()`` mode, a float input batch ``(N, C, H, W)`` in the model's input
space and a target: a class (``int`` or one per input) or a :class:`UnitTarget` (channel ``k`` of a named
layer, its spatial mean or max; ``units=None`` = every unit, batched in one autograd graph per chunk —
see :mod:`._engine` for the trick and its cost). Maps are returned raw (signed, unnormalised, at the
method's own resolution); display transforms (:func:`saliency_map`, :func:`upsample`, ReLU, normalisation)
are separate. The pipeline stages ``attribute`` and ``attribution_mass`` wrap these functions.

Conventions where implementations disagree are stated in each function's module docstring and tested
against captum where it has the method.
"""

from ._cam import cam, grad_cam, guided_grad_cam, upsample
from ._dataset import ConceptMass, concept_masks, maps_from_table, maps_table, mass_fractions, top_exemplars
from ._dispatch import METHODS, attribute
from ._engine import MapFn, RowUnitTarget, UnitTarget, backward_maps, module_by_name, target_scores
from ._gradients import deconvnet, guided_backprop, saliency, saliency_map, smoothgrad
from ._lime import SEGMENTATIONS, grid_segments, lime, lime_segments, ridge_surrogate
from ._lrp import LRP_RULES, lrp
from ._occlusion import occlusion, occlusion_positions
from ._relu import RULES, relu_backward_rule, relu_rule
from ._slic import slic_segments

__all__ = [
    "ConceptMass", "LRP_RULES", "METHODS", "attribute", "RULES", "concept_masks", "maps_from_table", "maps_table", "mass_fractions",
    "top_exemplars", "RowUnitTarget", "UnitTarget", "backward_maps", "cam", "deconvnet", "grad_cam", "grid_segments",
    "guided_backprop", "guided_grad_cam", "lime", "lrp", "module_by_name", "occlusion", "occlusion_positions",
    "relu_backward_rule", "relu_rule", "ridge_surrogate", "saliency", "saliency_map", "smoothgrad",
    "target_scores", "upsample", "MapFn", "SEGMENTATIONS", "lime_segments", "slic_segments",
]
