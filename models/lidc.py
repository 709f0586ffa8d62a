"""LIDC-IDRI reader annotations: parse the XML, place the marks on the CT grid, group them into nodules.

The reading sessions of one scan (up to four radiologists) are parsed into marks of three kinds:
outlined nodules (3 mm or more, contours on several slices), small nodules (under 3 mm, one point)
and non-nodules (one point). On a loaded series each mark gets a centre in patient millimetres
(LPS ``xyz``) and, when outlined, a mask on the CT voxel grid (``kji``). Marks of different readers
whose centres lie within 10 mm are grouped; a group with at least one outline is a nodule with a
50 % consensus mask. ``LidcCase.targets`` and ``LidcCase.ignore_marks`` follow LUNA16. Masks and
sizes are those of ``models.measurements`` (long and short axis on the axial slice of largest area,
volume), so LIDC truth compares with the pipeline's findings.

Contour pixels. LIDC readers were told to draw each outline just outside the nodule, so that the
drawn pixels do not cover nodule pixels. By default (``include_edge=False``) a mask is therefore the
strict interior of its contours, without the drawn pixels; ``include_edge=True`` adds them (the
larger, "outline included" reading used by some tools). Either way an exclusion contour
(``inclusion`` FALSE) removes only its strict interior: its own drawn pixels lie on nodule tissue.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.ground_truth import IgnoreMark
from models.measurements import BoxMask, axial_diameters, volume_mm3
from models.series_loading import load_series
from models.volume import Volume

LIDC_NAMESPACE = "http://www.nih.gov"
GROUPING_DISTANCE_MM = 10.0
LUNA16_MIN_READERS = 3
CONSENSUS_FRACTION = 0.5

Array = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


class LidcError(ValueError):
    """An annotation that cannot be read or placed on its series; the message says why."""


class MarkKind(StrEnum):
    OUTLINED = "nodule>=3mm"
    SMALL = "nodule<3mm"
    NON_NODULE = "non-nodule"


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True, eq=False)
class Roi:
    """One contour (or one point) on one image. ``points`` is (n, 2): pixel x = column, y = row."""

    z_position: float
    sop_uid: str
    inclusion: bool
    points: IntArray


@dataclass(frozen=True)
class Characteristics:
    subtlety: int | None = None
    internal_structure: int | None = None
    calcification: int | None = None
    sphericity: int | None = None
    margin: int | None = None
    lobulation: int | None = None
    spiculation: int | None = None
    texture: int | None = None
    malignancy: int | None = None


@dataclass(frozen=True, eq=False)
class ReaderMark:
    mark_id: str
    kind: MarkKind
    rois: tuple[Roi, ...]
    characteristics: Characteristics | None = None


@dataclass(frozen=True, eq=False)
class ReadingSession:
    reader_id: str
    marks: tuple[ReaderMark, ...]

    def of_kind(self, kind: MarkKind) -> tuple[ReaderMark, ...]:
        return tuple(m for m in self.marks if m.kind is kind)


@dataclass(frozen=True, eq=False)
class LidcAnnotation:
    series_instance_uid: str | None
    study_instance_uid: str | None
    sessions: tuple[ReadingSession, ...]


_CHARACTERISTIC_TAGS = {
    "subtlety": "subtlety",
    "internalStructure": "internal_structure",
    "calcification": "calcification",
    "sphericity": "sphericity",
    "margin": "margin",
    "lobulation": "lobulation",
    "spiculation": "spiculation",
    "texture": "texture",
    "malignancy": "malignancy",
}


class _Tags:
    """Qualified tag names in the document's namespace (LIDC files use http://www.nih.gov)."""

    def __init__(self, root: ET.Element) -> None:
        self.prefix = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""

    def __call__(self, name: str) -> str:
        return self.prefix + name

    def text(self, element: ET.Element | None, name: str) -> str | None:
        if element is None:
            return None
        text = element.findtext(self(name))
        return text.strip() if text is not None and text.strip() else None


def parse_lidc_xml(path: str | Path) -> LidcAnnotation:
    """Read one LIDC reader annotation file (LidcReadMessage) into reading sessions and marks."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise LidcError(f"{path}: not well-formed XML: {error}") from error
    tags = _Tags(root)
    if root.tag != tags("LidcReadMessage"):
        raise LidcError(f"{path}: root element is {root.tag}, not an LIDC LidcReadMessage")
    header = root.find(tags("ResponseHeader"))
    sessions = tuple(
        _parse_session(session, index, tags)
        for index, session in enumerate(root.iter(tags("readingSession")))
    )
    return LidcAnnotation(
        series_instance_uid=tags.text(header, "SeriesInstanceUid"),
        study_instance_uid=tags.text(header, "StudyInstanceUID"),
        sessions=sessions,
    )


def _parse_session(session: ET.Element, index: int, tags: _Tags) -> ReadingSession:
    reader_id = tags.text(session, "servicingRadiologistID") or str(index)
    marks = [_parse_nodule(n, tags) for n in session.findall(tags("unblindedReadNodule"))]
    marks += [_parse_non_nodule(n, tags) for n in session.findall(tags("nonNodule"))]
    return ReadingSession(reader_id=reader_id, marks=tuple(marks))


def _parse_nodule(element: ET.Element, tags: _Tags) -> ReaderMark:
    mark_id = tags.text(element, "noduleID") or ""
    rois = tuple(_parse_roi(roi, tags, mark_id) for roi in element.findall(tags("roi")))
    if not rois:
        raise LidcError(f"nodule {mark_id!r} has no roi")
    is_point = len(rois) == 1 and len(rois[0].points) == 1
    return ReaderMark(
        mark_id=mark_id,
        kind=MarkKind.SMALL if is_point else MarkKind.OUTLINED,
        rois=rois,
        characteristics=_parse_characteristics(element.find(tags("characteristics")), tags),
    )


def _parse_roi(roi: ET.Element, tags: _Tags, mark_id: str) -> Roi:
    points = [_parse_xy(edge, tags, mark_id) for edge in roi.findall(tags("edgeMap"))]
    if not points:
        raise LidcError(f"nodule {mark_id!r} has a roi without edgeMap points")
    return Roi(
        z_position=_required_float(roi, "imageZposition", tags, mark_id),
        sop_uid=tags.text(roi, "imageSOP_UID") or "",
        inclusion=(tags.text(roi, "inclusion") or "TRUE").upper() == "TRUE",
        points=np.array(points, dtype=np.int64),
    )


def _parse_non_nodule(element: ET.Element, tags: _Tags) -> ReaderMark:
    mark_id = tags.text(element, "nonNoduleID") or ""
    locus = element.find(tags("locus"))
    if locus is None:
        raise LidcError(f"non-nodule {mark_id!r} has no locus")
    roi = Roi(
        z_position=_required_float(element, "imageZposition", tags, mark_id),
        sop_uid=tags.text(element, "imageSOP_UID") or "",
        inclusion=True,
        points=np.array([_parse_xy(locus, tags, mark_id)], dtype=np.int64),
    )
    return ReaderMark(mark_id=mark_id, kind=MarkKind.NON_NODULE, rois=(roi,))


def _parse_characteristics(element: ET.Element | None, tags: _Tags) -> Characteristics | None:
    if element is None:
        return None
    values: dict[str, int] = {}
    for tag, field_name in _CHARACTERISTIC_TAGS.items():
        text = tags.text(element, tag)
        if text is not None and text.lstrip("-").isdigit():
            values[field_name] = int(text)
    return Characteristics(**values) if values else None


def _parse_xy(element: ET.Element, tags: _Tags, mark_id: str) -> tuple[int, int]:
    x, y = tags.text(element, "xCoord"), tags.text(element, "yCoord")
    if x is None or y is None:
        raise LidcError(f"mark {mark_id!r} has a point without xCoord/yCoord")
    return round(float(x)), round(float(y))


def _required_float(element: ET.Element, name: str, tags: _Tags, mark_id: str) -> float:
    text = tags.text(element, name)
    if text is None:
        raise LidcError(f"mark {mark_id!r} has no {name}")
    return float(text)


# ---------------------------------------------------------------------------------------------
# Masks


def enclosing_box(masks: Iterable[BoxMask]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Offset and shape of the smallest box holding every non-empty mask."""
    boxes = [(np.asarray(m.offset), np.asarray(m.offset) + m.array.shape) for m in masks if m.voxel_count]
    if not boxes:
        return (0, 0, 0), (0, 0, 0)
    low = np.min([b[0] for b in boxes], axis=0)
    high = np.max([b[1] for b in boxes], axis=0)
    return tuple(int(v) for v in low), tuple(int(v) for v in high - low)  # type: ignore[return-value]


def consensus_mask(masks: Sequence[BoxMask], fraction: float = CONSENSUS_FRACTION) -> BoxMask:
    """Voxels marked by at least ``fraction`` of the masks (0.5: at least half of the readers)."""
    offset, shape = enclosing_box(masks)
    if not masks or 0 in shape:
        return BoxMask(offset, np.zeros((0, 0, 0), dtype=bool))
    votes = np.zeros(shape, dtype=np.int32)
    for mask in (m for m in masks if m.voxel_count):
        in_box = BoxMask(tuple(int(a - b) for a, b in zip(mask.offset, offset, strict=True)), mask.array)
        votes[in_box.slices()] += in_box.array
    return BoxMask.from_full(votes >= fraction * len(masks), offset)


def rasterise_contour(
    points_xy: npt.ArrayLike, shape: tuple[int, int], include_edge: bool = False
) -> BoolArray:
    """The region enclosed by a closed pixel contour, on an image of ``shape`` (rows, columns).

    ``points_xy`` is (n, 2) pixel (x = column, y = row); consecutive points (and the last and the
    first) are joined by straight pixel lines. Without ``include_edge`` the contour pixels themselves
    are left out (the LIDC convention: the outline lies on the nodule's outer border)."""
    row0, col0, local = _contour_box(np.asarray(points_xy, dtype=np.int64), include_edge)
    out = np.zeros(shape, dtype=bool)
    rows, cols = local.shape
    if row0 < 0 or col0 < 0 or row0 + rows > shape[0] or col0 + cols > shape[1]:
        raise LidcError(f"contour reaches outside the {shape[0]} x {shape[1]} image")
    out[row0 : row0 + rows, col0 : col0 + cols] = local
    return out


def _contour_box(points_xy: IntArray, include_edge: bool) -> tuple[int, int, BoolArray]:
    """Rasterise on the contour's own bounding box; returns (row0, col0, mask) of that box."""
    closed = np.vstack([points_xy, points_xy[:1]])
    pixels = [points_xy[:1]]
    for start, stop in itertools.pairwise(closed):
        steps = int(np.abs(stop - start).max())
        if steps:
            t = np.linspace(0.0, 1.0, steps + 1)[1:, None]
            pixels.append(np.rint(start + t * (stop - start)).astype(np.int64))
    xy = np.vstack(pixels)
    col0, row0 = xy.min(axis=0)
    edge = np.zeros((int(xy[:, 1].max() - row0 + 1), int(xy[:, 0].max() - col0 + 1)), dtype=bool)
    edge[xy[:, 1] - row0, xy[:, 0] - col0] = True
    # An 8-connected closed pixel chain separates its inside from the 4-connected outside.
    filled = ndimage.binary_fill_holes(edge)
    return int(row0), int(col0), filled if include_edge else filled & ~edge


# ---------------------------------------------------------------------------------------------
# Geometry on a series


@dataclass(frozen=True, eq=False)
class SliceLocator:
    """Finds the slice of an annotated image: by SOP Instance UID, else by z position."""

    uid_to_slice: dict[str, int]
    slice_z: Array
    tolerance_mm: float

    @classmethod
    def for_series(cls, volume: Volume, sop_instance_uids: Sequence[str]) -> SliceLocator:
        if len(sop_instance_uids) != volume.shape[0]:
            raise LidcError(f"{len(sop_instance_uids)} SOP Instance UIDs for {volume.shape[0]} slices")
        k = np.arange(volume.shape[0], dtype=np.float64)
        slice_z = volume.index_to_patient(np.column_stack([k, np.zeros_like(k), np.zeros_like(k)]))[:, 2]
        z_step = abs(volume.spacing[0] * volume.direction[2, 0])
        return cls(
            uid_to_slice={uid: index for index, uid in enumerate(sop_instance_uids)},
            slice_z=slice_z,
            tolerance_mm=z_step / 2 + 1e-3,
        )

    def slice_of(self, roi: Roi) -> int:
        if roi.sop_uid in self.uid_to_slice:
            return self.uid_to_slice[roi.sop_uid]
        nearest = int(np.argmin(np.abs(self.slice_z - roi.z_position)))
        distance = abs(float(self.slice_z[nearest]) - roi.z_position)
        if distance > self.tolerance_mm:
            raise LidcError(
                f"image {roi.sop_uid or '(no UID)'} at z = {roi.z_position} mm is not in the series, and the "
                f"nearest slice lies {distance:.2f} mm away (more than half a slice spacing)"
            )
        return nearest


def _mask_size(mask: BoxMask, volume: Volume) -> dict[str, float]:
    """Long and short axis on the axial slice of largest area, their mean and the volume of a mask, as
    ``models.measurements`` measures them. An empty mask (contours too thin to have an inside)
    measures 0."""
    if not mask.voxel_count:
        return dict.fromkeys(("long_axis_mm", "short_axis_mm", "mean_diameter_mm", "volume_mm3"), 0.0)
    axial = axial_diameters(mask, volume.spacing)
    return {
        "long_axis_mm": axial.long_axis_mm,
        "short_axis_mm": axial.short_axis_mm,
        "mean_diameter_mm": axial.mean_diameter_mm,
        "volume_mm3": volume_mm3(mask, volume.spacing),
    }


@dataclass(frozen=True, eq=False)
class PlacedMark:
    """A reader's mark on the CT grid. Point marks have no mask and no size (None); sizes are those of
    ``_mask_size``."""

    reader_id: str
    mark: ReaderMark
    centre_xyz: Array
    mask: BoxMask | None
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    mean_diameter_mm: float | None = None
    volume_mm3: float | None = None

    @property
    def kind(self) -> MarkKind:
        return self.mark.kind

    @property
    def malignancy(self) -> int | None:
        return self.mark.characteristics.malignancy if self.mark.characteristics else None


def place_mark(
    reader_id: str, mark: ReaderMark, volume: Volume, locator: SliceLocator, include_edge: bool = False
) -> PlacedMark:
    if mark.kind is not MarkKind.OUTLINED:
        roi = mark.rois[0]
        x, y = roi.points[0]
        centre = volume.index_to_patient([locator.slice_of(roi), y, x])
        return PlacedMark(reader_id=reader_id, mark=mark, centre_xyz=centre, mask=None)
    mask = mark_mask(mark, volume, locator, include_edge)
    if mask.voxel_count:
        centre = volume.index_to_patient(mask.centroid_kji())
    else:  # every contour too thin to have an inside: fall back to the drawn pixels
        centre = volume.index_to_patient(_contour_indices(mark, locator).mean(axis=0))
    return PlacedMark(reader_id, mark, centre, mask, **_mask_size(mask, volume))


def mark_mask(mark: ReaderMark, volume: Volume, locator: SliceLocator, include_edge: bool = False) -> BoxMask:
    """The mask of an outlined mark: inclusion contours added, then exclusion contours removed."""
    kji = _contour_indices(mark, locator)
    _, rows, cols = volume.shape
    if np.any(kji[:, 1:] < 0) or np.any(kji[:, 1] >= rows) or np.any(kji[:, 2] >= cols):
        raise LidcError(f"mark {mark.mark_id!r} has contour points outside the {rows} x {cols} image")
    low, high = kji.min(axis=0), kji.max(axis=0) + 1
    box = np.zeros(tuple(int(v) for v in high - low), dtype=bool)
    for inclusion in (True, False):
        for roi in (r for r in mark.rois if r.inclusion is inclusion):
            row0, col0, local = _contour_box(roi.points, include_edge=include_edge and inclusion)
            k, row, col = locator.slice_of(roi) - low[0], row0 - low[1], col0 - low[2]
            region = box[k, row : row + local.shape[0], col : col + local.shape[1]]
            if inclusion:
                region |= local
            else:
                region &= ~local
    return BoxMask.from_full(box, low)


def _contour_indices(mark: ReaderMark, locator: SliceLocator) -> IntArray:
    """(n, 3) grid indices (k, j = y, i = x) of every drawn point of a mark."""
    per_roi = [
        np.column_stack([np.full(len(r.points), locator.slice_of(r)), r.points[:, 1], r.points[:, 0]])
        for r in mark.rois
    ]
    return np.vstack(per_roi).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Grouping and nodules


@dataclass(frozen=True, eq=False)
class MarkGroup:
    """Marks of different readers that lie together (at most one mark per reader)."""

    marks: tuple[PlacedMark, ...]

    @property
    def centre_xyz(self) -> Array:
        return np.mean([m.centre_xyz for m in self.marks], axis=0)

    @property
    def reader_ids(self) -> tuple[str, ...]:
        return tuple(m.reader_id for m in self.marks)

    @property
    def outlines(self) -> tuple[PlacedMark, ...]:
        return tuple(m for m in self.marks if m.kind is MarkKind.OUTLINED)

    @property
    def kinds(self) -> tuple[MarkKind, ...]:
        return tuple(m.kind for m in self.marks)


def group_marks(
    marks: Sequence[PlacedMark], max_distance_mm: float = GROUPING_DISTANCE_MM
) -> tuple[MarkGroup, ...]:
    """Join marks whose centres lie within ``max_distance_mm``, closest pairs first, never putting
    two marks of one reader in a group. Groups come in the order of their first mark."""
    parent = list(range(len(marks)))
    readers = [{m.reader_id} for m in marks]

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    centres = np.array([m.centre_xyz for m in marks]).reshape(-1, 3)
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    first, second = np.triu_indices(len(marks), k=1)
    close = distance[first, second] <= max_distance_mm
    pairs = sorted(zip(distance[first, second][close], first[close], second[close], strict=True))
    for _, a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb and not readers[ra] & readers[rb]:
            parent[rb] = ra
            readers[ra] |= readers[rb]
    members: dict[int, list[PlacedMark]] = {}
    for index, mark in enumerate(marks):
        members.setdefault(root(index), []).append(mark)
    return tuple(MarkGroup(tuple(group)) for group in members.values())


@dataclass(frozen=True, eq=False)
class Nodule:
    """A group with at least one outline (a nodule of 3 mm or more) and its consensus."""

    group: MarkGroup
    consensus: BoxMask
    centre_xyz: Array
    long_axis_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    volume_mm3: float
    hu_at_centre: float
    mean_hu: float

    @property
    def outlines(self) -> tuple[PlacedMark, ...]:
        return self.group.outlines

    @property
    def reader_ids(self) -> tuple[str, ...]:
        """The readers who outlined the nodule."""
        return tuple(m.reader_id for m in self.outlines)

    @property
    def reader_count(self) -> int:
        return len(self.outlines)

    @property
    def reader_masks(self) -> dict[str, BoxMask]:
        return {m.reader_id: m.mask for m in self.outlines if m.mask is not None}

    @property
    def malignancy(self) -> tuple[int, ...]:
        return tuple(m.malignancy for m in self.outlines if m.malignancy is not None)


def make_nodule(group: MarkGroup, volume: Volume, fraction: float = CONSENSUS_FRACTION) -> Nodule:
    masks = [m.mask for m in group.outlines if m.mask is not None]
    if not masks:
        raise LidcError("a nodule needs at least one outlined mark")
    consensus = consensus_mask(masks, fraction)
    if consensus.voxel_count:
        centre = volume.index_to_patient(consensus.centroid_kji())
        mean_hu = float(volume.hu[consensus.slices()][consensus.array].mean())
    else:
        centre = np.mean([m.centre_xyz for m in group.outlines], axis=0)
        mean_hu = float("nan")
    return Nodule(
        group=group,
        consensus=consensus,
        centre_xyz=centre,
        **_mask_size(consensus, volume),
        hu_at_centre=float(volume.hu[volume.nearest_index(centre)]),
        mean_hu=mean_hu,
    )


def select_targets(nodules: Iterable[Nodule], min_readers: int = LUNA16_MIN_READERS) -> tuple[Nodule, ...]:
    """Nodules of 3 mm or more outlined by at least ``min_readers`` readers."""
    return tuple(n for n in nodules if n.reader_count >= min_readers)


def select_ignore_marks(
    groups: Iterable[MarkGroup], min_readers: int = LUNA16_MIN_READERS
) -> tuple[IgnoreMark, ...]:
    """Every mark outside the target groups, one entry per reader mark, that counts neither as a hit
    nor as a false positive (LUNA16). Marks grouped with a target (a reader's point on an outlined
    nodule) are left out: the target already covers them. ``kind`` is the mark's ``MarkKind``;
    ``diameter_mm`` is an outline's long axis, 0 for a point mark (not measured)."""
    return tuple(
        IgnoreMark(
            centre_mm=(float(m.centre_xyz[0]), float(m.centre_xyz[1]), float(m.centre_xyz[2])),
            kind=m.kind,
            diameter_mm=m.long_axis_mm or 0.0,
            reader_id=m.reader_id,
        )
        for group in groups
        if len(group.outlines) < min_readers
        for m in group.marks
    )


# ---------------------------------------------------------------------------------------------
# A whole case


@dataclass(frozen=True, eq=False)
class LidcCase:
    annotation: LidcAnnotation
    volume: Volume
    sop_instance_uids: tuple[str, ...]
    marks: tuple[PlacedMark, ...]
    groups: tuple[MarkGroup, ...]
    nodules: tuple[Nodule, ...]
    xml_path: Path | None = None

    @property
    def reader_ids(self) -> tuple[str, ...]:
        return tuple(s.reader_id for s in self.annotation.sessions)

    def reader_mask(self, reader_id: str) -> BoolArray:
        """Full-size mask of everything one reader outlined."""
        out = np.zeros(self.volume.shape, dtype=bool)
        for mark in self.marks:
            if mark.reader_id == reader_id and mark.mask is not None:
                mark.mask.paste_into(out)
        return out

    def targets(self, min_readers: int = LUNA16_MIN_READERS) -> tuple[Nodule, ...]:
        return select_targets(self.nodules, min_readers)

    def ignore_marks(self, min_readers: int = LUNA16_MIN_READERS) -> tuple[IgnoreMark, ...]:
        return select_ignore_marks(self.groups, min_readers)

    def every_mark(self) -> list[IgnoreMark]:
        """Every reader mark, each outlined nodule as one mark: where no synthetic nodule may go, and
        where a detection in an inserted case counts as neither hit nor false positive."""
        nodules = [
            IgnoreMark(
                centre_mm=(float(n.centre_xyz[0]), float(n.centre_xyz[1]), float(n.centre_xyz[2])),
                kind=f"real nodule, {n.reader_count} readers",
                diameter_mm=n.long_axis_mm,
            )
            for n in self.nodules
        ]
        return nodules + list(self.ignore_marks(min_readers=1))


def build_lidc_case(
    annotation: LidcAnnotation,
    volume: Volume,
    sop_instance_uids: Sequence[str],
    *,
    include_edge: bool = False,
    max_distance_mm: float = GROUPING_DISTANCE_MM,
    xml_path: Path | None = None,
) -> LidcCase:
    """Place every mark of ``annotation`` on the volume, group the marks and build the nodules."""
    locator = SliceLocator.for_series(volume, sop_instance_uids)
    marks = tuple(
        place_mark(session.reader_id, mark, volume, locator, include_edge)
        for session in annotation.sessions
        for mark in session.marks
    )
    groups = group_marks(marks, max_distance_mm)
    nodules = tuple(make_nodule(g, volume) for g in groups if g.outlines)
    return LidcCase(annotation, volume, tuple(sop_instance_uids), marks, groups, nodules, xml_path)


def find_lidc_xml(series_dir: str | Path, series_instance_uid: str | None = None) -> Path:
    """The annotation XML in a series folder; with several, the one naming ``series_instance_uid``."""
    candidates = sorted(Path(series_dir).glob("*.xml"))
    if series_instance_uid is not None and len(candidates) > 1:
        candidates = [p for p in candidates if parse_lidc_xml(p).series_instance_uid == series_instance_uid]
    if len(candidates) != 1:
        raise LidcError(f"expected one LIDC annotation XML in {series_dir}, found {len(candidates)}")
    return candidates[0]


def read_lidc_case(series_dir: str | Path, *, include_edge: bool = False) -> LidcCase:
    """Load an LIDC series folder (DICOM slices and the reader XML) and place its annotations."""
    series = load_series(series_dir)
    xml_path = find_lidc_xml(series_dir, series.series_instance_uid)
    annotation = parse_lidc_xml(xml_path)
    uid = annotation.series_instance_uid
    if uid is not None and uid != series.series_instance_uid:
        raise LidcError(
            f"{xml_path.name} annotates series {uid}, the folder holds {series.series_instance_uid}"
        )
    return build_lidc_case(
        annotation, series.volume, series.sop_instance_uids, include_edge=include_edge, xml_path=xml_path
    )
