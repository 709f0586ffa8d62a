"""Lung-RADS v2022 baseline category suggested from a nodule's type and size (mean diameter:
long plus short axis over two, in mm). A suggestion to the radiologist, never a diagnosis."""

from __future__ import annotations


def lung_rads_category(nodule_type: str, mean_diameter_mm: float, solid_part_mm: float) -> str:
    if nodule_type == "calcified":
        return "1"  # benign pattern of calcification
    if nodule_type == "solid":
        return _by_thresholds(mean_diameter_mm, [(6.0, "2"), (8.0, "3"), (15.0, "4A")], "4B")
    if nodule_type == "part-solid":
        if mean_diameter_mm < 6.0:
            return "2"
        return _by_thresholds(solid_part_mm, [(6.0, "3"), (8.0, "4A")], "4B")
    if nodule_type == "ground-glass":
        return "2" if mean_diameter_mm < 30.0 else "3"
    raise ValueError(f"no Lung-RADS rule for nodule type {nodule_type!r}")


def _by_thresholds(value: float, limits: list[tuple[float, str]], above: str) -> str:
    for limit, category in limits:
        if value < limit:
            return category
    return above
