"""SpineLabel's Slicer logic without Qt: MRML nodes for a labelling, interactive corrections, export, and the
background process runner. ``scene`` imports ``slicer`` (MRML and module logics, ``slicer.util``) and ``vtk``;
``process`` and ``worker`` import neither, so the worker also runs in a plain Python process.

Import the submodules explicitly (``from SpineLabelLogic.scene import LabelingScene``); this package's
``__init__`` imports nothing so that ``python -m SpineLabelLogic.worker`` stays free of ``slicer``.
"""
