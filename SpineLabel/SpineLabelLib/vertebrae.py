"""The one definition of every vertebra SpineLabel knows: name, label value, colour and SNOMED CT code.

Label values follow the VerSe challenge numbering (Sekuboyina et al., Medical Image Analysis 2021):
1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum (S1), 28 T13, 0 background.

``LEVELS`` lists the vertebrae in anatomical (cranio-caudal) order, T13 between T12 and L1 and L6 between L5
and S1. The index of a level in ``LEVELS`` is also the channel index of the network's level head.

SNOMED CT codes are the DICOM CID 7603 "Vertebra" codes (C1-L5) and 54735007 "Sacrum". T13 and L6 have no
level-specific SNOMED CT concept; they carry 51282000 "Vertebra" and their level in the segment name.

The same definition gives 3D Slicer its terminology: :func:`terminology_context` is SpineLabel's terminology context
(named ``TERMINOLOGY_CONTEXT``), which the Slicer module loads at start-up, and :func:`terminology_entry` is a
segment's entry in it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = [
    "Level",
    "LEVELS",
    "BY_NAME",
    "BY_LABEL",
    "level_index",
    "TERMINOLOGY_CONTEXT",
    "terminology_context",
    "terminology_entry",
    "COCCYX_LABEL",
    "TISSUE_NAMES",
    "BODY",
    "POSTERIOR",
    "DISC",
]


@dataclass(frozen=True)
class Level:
    """One vertebral level.

    Attributes:
        name: level name as radiologists write it (``"C1"``, ``"T12"``, ``"S1"``).
        label: VerSe label value (1..28) used in every label map SpineLabel reads or writes.
        region: ``"cervical"``, ``"thoracic"``, ``"lumbar"`` or ``"sacral"``.
        colour: display colour, RGB in 0-1.
        snomed_code: SNOMED CT concept id of the bone structure.
        snomed_meaning: the concept's display name.
        transitional: True for the supernumerary levels T13 and L6.
    """

    name: str
    label: int
    region: str
    colour: tuple[float, float, float]
    snomed_code: str
    snomed_meaning: str
    transitional: bool = False


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    return tuple(round(int(hex_colour[i : i + 2], 16) / 255.0, 4) for i in (0, 2, 4))  # type: ignore[return-value]


# Each region keeps a family of hues (cervical blue, thoracic green, lumbar orange, the sacrum purple; T13 yellow, L6
# red) drifting along it, and the levels cycle through a middle, a light and a dark shade (CIELAB lightness 58, 84,
# 36): vertebrae up to two levels apart, whose posterior elements meet, differ by a CIEDE2000 colour difference of 17
# or more (with light and dark shades only in turn, levels two apart differed by 3). The lightness cycle keeps them
# apart for a reader without one kind of cone too: simulated for protanopia, deuteranopia and tritanopia (Machado et
# al. 2009) they differ by 9.7 or more (least at T12-L1 and T13-L1, which lean most on hue), and by 7.4 or more as the
# half-opaque fill over mid grey of a slice view (normal vision: 10).
LEVELS: tuple[Level, ...] = (
    Level("C1", 1, "cervical", _rgb("009dc2"), "14806007", "C1 vertebra"),
    Level("C2", 2, "cervical", _rgb("33e2ff"), "39976000", "C2 vertebra"),
    Level("C3", 3, "cervical", _rgb("006096"), "113205007", "C3 vertebra"),
    Level("C4", 4, "cervical", _rgb("0095d7"), "5329002", "C4 vertebra"),
    Level("C5", 5, "cervical", _rgb("86d8ff"), "36978003", "C5 vertebra"),
    Level("C6", 6, "cervical", _rgb("00579d"), "36054005", "C6 vertebra"),
    Level("C7", 7, "cervical", _rgb("6d89d7"), "87391001", "C7 vertebra"),
    Level("T1", 8, "thoracic", _rgb("bfdd7e"), "64864005", "T1 vertebra"),
    Level("T2", 9, "thoracic", _rgb("375f04"), "53733008", "T2 vertebra"),
    Level("T3", 10, "thoracic", _rgb("689844"), "1626008", "T3 vertebra"),
    Level("T4", 11, "thoracic", _rgb("a6e18b"), "73071006", "T4 vertebra"),
    Level("T5", 12, "thoracic", _rgb("1a621a"), "56401006", "T5 vertebra"),
    Level("T6", 13, "thoracic", _rgb("4d9c54"), "45296009", "T6 vertebra"),
    Level("T7", 14, "thoracic", _rgb("8be59d"), "62487009", "T7 vertebra"),
    Level("T8", 15, "thoracic", _rgb("00642c"), "11068009", "T8 vertebra"),
    Level("T9", 16, "thoracic", _rgb("259e67"), "82687006", "T9 vertebra"),
    Level("T10", 17, "thoracic", _rgb("6ce8b1"), "7610001", "T10 vertebra"),
    Level("T11", 18, "thoracic", _rgb("00663f"), "12989004", "T11 vertebra"),
    Level("T12", 19, "thoracic", _rgb("00a07b"), "23215003", "T12 vertebra"),
    Level("T13", 28, "thoracic", _rgb("dfc738"), "51282000", "Vertebra", transitional=True),
    Level("L1", 20, "lumbar", _rgb("ffad8c"), "66794005", "L1 vertebra"),
    Level("L2", 21, "lumbar", _rgb("973407"), "14293000", "L2 vertebra"),
    Level("L3", 22, "lumbar", _rgb("d17331"), "36470004", "L3 vertebra"),
    Level("L4", 23, "lumbar", _rgb("ffbe69"), "11994002", "L4 vertebra"),
    Level("L5", 24, "lumbar", _rgb("7b4a00"), "49668003", "L5 vertebra"),
    Level("L6", 25, "lumbar", _rgb("dc3749"), "51282000", "Vertebra", transitional=True),
    Level("S1", 26, "sacral", _rgb("a05cb4"), "54735007", "Sacrum"),
)

BY_NAME: dict[str, Level] = {level.name: level for level in LEVELS}
BY_LABEL: dict[int, Level] = {level.label: level for level in LEVELS}
_INDEX: dict[str, int] = {level.name: i for i, level in enumerate(LEVELS)}


# VerSe's value for the coccyx, which SpineLabel does not label; label lists that must run without a gap name it
COCCYX_LABEL = 27

# Tissue classes of the network's tissue head and of every training target (values 0..3). C1 has no body and the
# sacrum is one bone; the two sources of whole-spine targets differ there: the procedural phantoms count C1 and the
# whole sacrum as vertebral body, the synthetic spines C1's anterior arch and lateral masses and the S1 body only (the
# rest of the sacrum is posterior elements, which is what the network has learnt to call it).
TISSUE_NAMES = ("background", "vertebral body", "posterior elements", "intervertebral disc")
BODY, POSTERIOR, DISC = 1, 2, 3


def level_index(name_or_label: str | int) -> int:
    """Position of a level in ``LEVELS`` (anatomical order), from its name or its VerSe label value."""
    if isinstance(name_or_label, str):
        key = name_or_label.strip().upper()
        if key == "SACRUM":
            key = "S1"
        if key not in _INDEX:
            raise KeyError(f"unknown vertebra name {name_or_label!r}; expected one of {', '.join(_INDEX)}")
        return _INDEX[key]
    if isinstance(name_or_label, bool) or not isinstance(name_or_label, numbers.Integral):
        raise KeyError(f"{name_or_label!r}: a level is named ('L1') or given by its VerSe label value (an integer)")
    if int(name_or_label) not in BY_LABEL:
        raise KeyError(f"unknown VerSe label value {name_or_label!r}")
    return _INDEX[BY_LABEL[int(name_or_label)].name]


# SpineLabel's terminology context: its name, its schema (dcmqi segment context, which Slicer 5.6 and later load) and
# its one category, "Anatomical Structure"
TERMINOLOGY_CONTEXT = "Segmentation category and type - SpineLabel"
_CONTEXT_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#"
_CATEGORY = {"CodingSchemeDesignator": "SCT", "CodeValue": "123037004", "CodeMeaning": "Anatomical Structure"}


def terminology_context() -> dict:
    """SpineLabel's 3D Slicer terminology context, the JSON document Slicer's
    ``vtkSlicerTerminologiesModuleLogic.LoadTerminologyFromFile`` reads.

    One category, "Anatomical Structure" (SCT 123037004), with one type per SNOMED CT code of ``LEVELS``: code and
    meaning of the level, its colour as the recommended display colour (RGB 0-255). Slicer tells types apart by
    their code alone, so T13 and L6, which share 51282000 "Vertebra", share one type: the one of the first level
    carrying that code (T13), with T13's colour.
    """
    types: dict[str, dict] = {}
    for level in LEVELS:
        if level.snomed_code not in types:
            types[level.snomed_code] = {
                "CodingSchemeDesignator": "SCT",
                "CodeValue": level.snomed_code,
                "CodeMeaning": level.snomed_meaning,
                "recommendedDisplayRGBValue": [round(c * 255) for c in level.colour],
            }
    return {
        "@schema": _CONTEXT_SCHEMA,
        "SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT,
        "SegmentationCodes": {"Category": [{**_CATEGORY, "showAnatomy": False, "Type": list(types.values())}]},
    }


# the anatomic region (DICOM CID 4) that tells T13 and L6, both coded "Vertebra" (SCT 51282000), apart
_TRANSITIONAL_REGION = {"thoracic": "SCT^122495006^Thoracic spine", "lumbar": "SCT^122496007^Lumbar spine"}


def terminology_entry(level: Level) -> str:
    """Slicer terminology entry string for a level (``Segment<N>_Tags`` ``TerminologyEntry`` value): the level's
    type in SpineLabel's terminology context (:func:`terminology_context`), without type modifier; with a region,
    thoracic or lumbar spine, for T13 and L6 only.

    Format: ``context~category~type~typeModifier~regionContext~region~regionModifier``, each coded part as
    ``SCT^code^meaning``.
    """
    region = _TRANSITIONAL_REGION[level.region] if level.transitional else "^^"
    return (
        f"{TERMINOLOGY_CONTEXT}"
        f"~SCT^{_CATEGORY['CodeValue']}^{_CATEGORY['CodeMeaning']}"
        f"~SCT^{level.snomed_code}^{level.snomed_meaning}"
        "~^^"
        f"~Anatomic codes - DICOM master list~{region}~^^"
    )
