"""SpineLabel training tools: synthetic whole-spine training cases built from real vertebra shapes.

``shapes`` gathers real vertebra, sacrum and disc shapes into a :class:`ShapeLibrary`; ``synthesis`` assembles
them into whole spines with ribs, canal and surrounding tissues and synthesises CT- and MR-like images from the
label maps with randomised contrast and resolution, SynthSeg-style (Billot et al., Medical Image Analysis 2023).
"""

from SpineLabelTrainingLib.shapes import ShapeLibrary, build_shape_library
from SpineLabelTrainingLib.synthesis import IGNORE, TISSUE_NAMES, TrainingCase, synthesize_case

__all__ = ["ShapeLibrary", "build_shape_library", "TISSUE_NAMES", "IGNORE", "TrainingCase",
           "synthesize_case"]
