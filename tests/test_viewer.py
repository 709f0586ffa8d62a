"""The radiologist's viewer: OHIF (orthanc/viewer) on the local Orthanc, driven in headless Chromium.

LIDC-IDRI-0001 goes through Orthanc and the node; OHIF then opens the study. What the viewer shows is
checked against the SR and SEG read back from Orthanc: each SR outline is drawn on its source slice,
where the SR puts it, with the SR's values; the SEG overlay of each nodule lies on the nodule on the
same slice (not shifted, flipped or on another slice). Screenshots go to the test's folder, and to
docs/images/viewer-*.png with CAD_NODE_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from tests.conftest import _require_tool
from tests.node_process import RunningNode
from tests.peers import Orthanc, free_port, storescu, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VIEWER = ROOT / "orthanc" / "viewer"
IMAGES = ROOT / "docs" / "images"
ANALYSIS_TIMEOUT_S = 300.0
UI_TIMEOUT_S = 90.0
WINDOW = (1600, 1000)
# The SR and the SEG put a nodule within this distance of where the viewer draws it.
TOLERANCE_MM = 1.5


@dataclass(frozen=True)
class SrNodule:
    """One planar group of the node's SR: what OHIF should draw."""

    tracking_id: str
    tracking_uid: str
    sop_instance_uid: str
    outline_mm: npt.NDArray[np.float64]  # (n, 3) patient coordinates
    labels: tuple[str, ...]  # the text OHIF writes beside the outline
    caption: str  # the group's comment: the label of the measurement OHIF loads into its panel


@dataclass(frozen=True)
class StudyInViewer:
    driver: Any  # selenium WebDriver
    url: str
    study_uid: str
    nodules: list[SrNodule]
    seg: Dataset
    ct: dict[str, Dataset]  # SOP Instance UID -> CT header
    shots: Path


def _selenium() -> Any:
    try:
        from selenium import webdriver
    except ImportError:
        reason = "the Python package selenium is not installed (pip install 'selenium>=4.20')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: CI must install it")
        pytest.skip(reason)
    return webdriver


def _ohif_dist() -> Path:
    _require_tool("npm")
    done = subprocess.run(
        ["bash", str(VIEWER / "install.sh")], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"orthanc/viewer/install.sh failed:\n{done.stdout}{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def _pixel_to_patient(image: Dataset, column_row: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """SR image coordinates ((0, 0) the top left corner of the top left pixel) to patient coordinates."""
    orientation = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    origin = np.asarray(image.ImagePositionPatient, dtype=np.float64)
    columns, rows = column_row[:, :1] - 0.5, column_row[:, 1:2] - 0.5
    return origin + columns * column_spacing * orientation[:3] + rows * row_spacing * orientation[3:]


def _label(name: str, value: float, unit: str) -> str:
    return f"{name}: {value:.2f} {unit}"


def _sr_nodules(sr: Dataset, ct: dict[str, Dataset]) -> list[SrNodule]:
    import highdicom as hd

    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    nodules = []
    for group in report.content.get_planar_roi_measurement_groups():
        region = group.roi
        sop = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        outline = np.asarray(region.value, dtype=np.float64)
        # The first five NUMs, as OHIF writes them: "<concept name>: <value> <unit code>".
        labels = tuple(
            _label(m.name.meaning, float(m.value), m.unit.value) for m in group.get_measurements()
        )[:5]
        (caption,) = [
            str(item.TextValue)
            for item in group[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "121106"  # DCM Comment
        ]
        nodules.append(
            SrNodule(
                tracking_id=str(group.tracking_identifier),
                tracking_uid=str(group.tracking_uid),
                sop_instance_uid=sop,
                outline_mm=_pixel_to_patient(ct[sop], outline),
                labels=labels,
                caption=caption,
            )
        )
    return nodules


def _instance(pacs: Orthanc, series_id: str) -> Dataset:
    (instance,) = pacs.rest(f"/series/{series_id}/instances")
    return pydicom.dcmread(pacs_file(pacs, f"/instances/{instance['ID']}/file"))


def pacs_file(pacs: Orthanc, path: str) -> io.BytesIO:
    import urllib.request

    with urllib.request.urlopen(pacs.url + path, timeout=60) as answer:
        return io.BytesIO(answer.read())


@pytest.fixture(scope="module")
def study_in_viewer(
    lidc_series_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StudyInViewer]:
    """LIDC-IDRI-0001 through Orthanc and the node, then OHIF (served by orthanc/viewer/serve.py) on it
    in headless Chromium."""
    webdriver = _selenium()
    for program in ("Orthanc", "storescu", "chromium", "chromedriver"):
        _require_tool(program)
    dist = _ohif_dist()
    files = sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))
    ct = {str(h.SOPInstanceUID): h for h in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    node = RunningNode()
    with ExitStack() as stack:
        pacs = stack.enter_context(Orthanc(node=f"{node.ae_title}@127.0.0.1:{node.port}", stable_age=2))
        node.destinations = [f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"]
        node.allowed_callers = [f"{pacs.ae_title}@127.0.0.1"]
        stack.enter_context(node)
        storescu(files, pacs.dicom_port, pacs.ae_title, calling_aet="MODALITY")

        def results_back() -> list[dict[str, Any]] | None:
            studies = pacs.studies()
            if len(studies) != 1:
                return None
            series = pacs.series_of_study(studies[0])
            return series if {"SR", "SEG"} <= {s["Modality"] for s in series} else None

        series = wait_until(results_back, ANALYSIS_TIMEOUT_S, interval=1.0, what="SR and SEG in Orthanc")
        by_modality = {s["Modality"]: s["ID"] for s in series}
        sr, seg = _instance(pacs, by_modality["SR"]), _instance(pacs, by_modality["SEG"])

        port = free_port()
        command = [sys.executable, str(VIEWER / "serve.py"), "--port", str(port), "--orthanc", pacs.url]
        server = subprocess.Popen([*command, "--dist", str(dist)], stdout=subprocess.DEVNULL)
        stack.callback(_stop_process, server)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url + "/app-config.js"), 15, what="the viewer's server")

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for argument in (
            "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1",
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
        ):  # fmt: skip
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
        driver = webdriver.Chrome(service=service, options=options)
        stack.callback(driver.quit)
        yield StudyInViewer(
            driver=driver,
            url=url,
            study_uid=str(sr.StudyInstanceUID),
            nodules=_sr_nodules(sr, ct),
            seg=seg,
            ct=ct,
            shots=tmp_path_factory.mktemp("viewer"),
        )


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request: pytest.FixtureRequest, study_in_viewer: StudyInViewer) -> Iterator[None]:
    """A failed check leaves the viewer's screen and the browser's console in the test's folder."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        name = request.node.name
        study_in_viewer.driver.save_screenshot(str(study_in_viewer.shots / f"failed-{name}.png"))
        console = "\n".join(str(entry) for entry in study_in_viewer.driver.get_log("browser"))
        (study_in_viewer.shots / f"failed-{name}.log").write_text(console)
        print(f"viewer screenshot and console: {study_in_viewer.shots}", file=sys.stderr)


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# --- driving OHIF -------------------------------------------------------------------------------------


def _by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def _wait_for(driver: Any, css: str, timeout: float = UI_TIMEOUT_S) -> Any:
    """The first displayed element matching ``css`` (or an XPath, starting with "/")."""
    from selenium.common.exceptions import StaleElementReferenceException

    kind = _by("XPATH") if css.startswith("/") else _by("CSS_SELECTOR")

    def found() -> Any:
        try:
            elements = [e for e in driver.find_elements(kind, css) if e.is_displayed()]
        except StaleElementReferenceException:  # React rendered it again meanwhile
            return None
        return elements[0] if elements else None

    return wait_until(found, timeout, interval=0.3, what=f"the viewer shows {css}")


def _click(driver: Any, css: str) -> None:
    """Clicks the element once the viewer shows it and it takes clicks (React may render it again)."""
    from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException

    def clicked() -> bool:
        try:
            _wait_for(driver, css).click()
        except (StaleElementReferenceException, ElementNotInteractableException):
            return False
        return True

    wait_until(clicked, UI_TIMEOUT_S, interval=0.3, what=f"a click on {css}")


def _open_study(study: StudyInViewer) -> None:
    """Opens the study as a radiologist would, dismissing the first-visit tour. What the first viewport
    shows is up to OHIF's hanging protocol (the node's PDF summary, for one): each check opens its series."""
    study.driver.get(f"{study.url}/viewer?StudyInstanceUIDs={study.study_uid}")
    for description in ("CAD nodules SR", "CAD nodules SEG"):
        _series_thumbnail(study.driver, description)
    skip = "//button[normalize-space()='Skip all']"
    try:
        _wait_for(study.driver, skip, timeout=10)
    except TimeoutError:
        return  # seen already in this browser
    _click(study.driver, skip)


def _series_thumbnail(driver: Any, description: str) -> Any:
    xpath = f"//*[@data-cy='series-description-label' and normalize-space()='{description}']"
    found = wait_until(lambda: driver.find_elements(_by("XPATH"), xpath), UI_TIMEOUT_S, what=description)
    return found[0]


def _open_series(driver: Any, description: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).double_click(_series_thumbnail(driver, description)).perform()


# The active viewport as OHIF holds it now (OHIF replaces the Cornerstone viewport when it opens a series).
_VIEWPORT = (
    "window.services.cornerstoneViewportService"
    ".getCornerstoneViewport(window.services.viewportGridService.getActiveViewportId())"
)


def _current_sop(driver: Any) -> str:
    """The SOP Instance UID of the image in the viewport (OHIF's image ids are WADO-RS frame URLs)."""
    image_id = driver.execute_script(
        f"try {{ return {_VIEWPORT}.getCurrentImageId() || ''; }} catch (e) {{ return ''; }}"
    )
    parts = str(image_id).split("/instances/")
    return parts[1].split("/")[0] if len(parts) == 2 else ""


def _to_canvas(driver: Any, points_mm: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    canvas = driver.execute_script(
        f"const vp = {_VIEWPORT}; return arguments[0].map(p => vp.worldToCanvas(p));", points_mm.tolist()
    )
    return np.asarray(canvas, dtype=np.float64)


def _canvas_px_per_mm(driver: Any, near_mm: npt.NDArray[np.float64], image: Dataset) -> float:
    row_direction = np.asarray(image.ImageOrientationPatient, dtype=np.float64)[:3]
    ends = _to_canvas(driver, np.stack([near_mm, near_mm + 10.0 * row_direction]))
    return float(np.linalg.norm(ends[1] - ends[0])) / 10.0


def _render_annotations(driver: Any) -> None:
    # A headless page gets no input events, which is what makes OHIF redraw its SVG layer in a browser.
    driver.execute_script(
        f"const vp = {_VIEWPORT}; vp.render();"
        "window.cornerstoneTools.utilities.triggerAnnotationRenderForViewportIds([vp.id]);"
    )
    time.sleep(0.5)


def _drawn_sr_annotations(driver: Any) -> dict[str, dict[str, Any]]:
    """The SR annotations drawn on the viewport's SVG layer: tracking UID -> outline points (canvas) and
    the lines of its text box. OHIF draws each outline, then the text group that names its annotation."""
    drawn = driver.execute_script(
        f"""const svg = {_VIEWPORT}.element.querySelector('svg.svg-layer');
        const found = []; let outline = null;
        for (const child of svg.children) {{
          if (child.tagName === 'polyline') outline = child.getAttribute('points');
          if (child.tagName === 'g' && child.dataset.annotationUid) {{
            found.push([child.dataset.annotationUid, outline,
                        [...child.querySelectorAll('tspan')].map(t => t.textContent)]);
            outline = null;
          }}
        }}
        return found;"""
    )
    result = {}
    for uid, points, lines in drawn:
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", points or "")]
        result[uid] = {"outline": np.asarray(numbers, dtype=np.float64).reshape(-1, 2), "lines": lines}
    return result


def _viewport_png(driver: Any) -> npt.NDArray[np.uint8]:
    """The viewport as drawn, without pop-up notifications, which come and go over it on their own."""
    driver.execute_script(HIDE_NOTIFICATIONS)
    element = driver.find_element(_by("CSS_SELECTOR"), "[data-cy='viewport-pane'] canvas")
    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))


HIDE_NOTIFICATIONS = """
if (!document.getElementById('hide-notifications')) {
  const style = document.createElement('style');
  style.id = 'hide-notifications';
  style.textContent = '[data-sonner-toaster] { display: none !important; }';
  document.head.appendChild(style);
}
"""


def _save_shot(study: StudyInViewer, name: str) -> Path:
    path = study.shots / name
    study.driver.save_screenshot(str(path))
    if os.environ.get("CAD_NODE_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(path, IMAGES / name)
    return path


# --- the checks ---------------------------------------------------------------------------------------


def test_sr_outlines_are_drawn_on_their_slices_with_the_sr_values(study_in_viewer: StudyInViewer) -> None:
    """Double-clicking the SR opens it on the CT; the viewport's arrows go from nodule to nodule. Each
    outline is drawn on the SR's source image, where the SR puts it (within 1.5 mm), with the SR's long
    axis, short axis, volume and attenuation beside it."""
    study = study_in_viewer
    driver = study.driver
    assert study.nodules, "the node reported no nodule in LIDC-IDRI-0001"
    _open_study(study)
    _open_series(driver, "CAD nodules SR")
    badge = _wait_for(driver, "[data-cy^='ModalityLoadBadge']")
    assert "SR" in badge.text
    first_sop = study.nodules[0].sop_instance_uid
    wait_until(lambda: _current_sop(driver) == first_sop, UI_TIMEOUT_S, what="the first nodule's slice")

    largest = max(study.nodules, key=lambda n: np.ptp(n.outline_mm, axis=0).max())
    for number, nodule in enumerate(study.nodules):
        if number:
            _click(driver, "[data-cy='viewport-action-arrows-right']")
        wait_until(
            lambda sop=nodule.sop_instance_uid: _current_sop(driver) == sop,
            UI_TIMEOUT_S,
            what=f"{nodule.tracking_id}'s source slice on screen",
        )
        _render_annotations(driver)
        drawn = wait_until(
            lambda uid=nodule.tracking_uid: _drawn_sr_annotations(driver).get(uid),
            UI_TIMEOUT_S,
            what=f"{nodule.tracking_id}'s outline drawn",
        )
        assert drawn["lines"] == list(nodule.labels), nodule.tracking_id
        expected = _to_canvas(driver, nodule.outline_mm)
        scale = _canvas_px_per_mm(driver, nodule.outline_mm[0], study.ct[nodule.sop_instance_uid])
        shift_mm = np.linalg.norm(drawn["outline"].mean(axis=0) - expected.mean(axis=0)) / scale
        extent_mm = np.abs(np.ptp(drawn["outline"], axis=0) - np.ptp(expected, axis=0)) / scale
        assert shift_mm < TOLERANCE_MM, f"{nodule.tracking_id}: outline drawn {shift_mm:.1f} mm off"
        assert extent_mm.max() < TOLERANCE_MM, f"{nodule.tracking_id}: outline size differs by {extent_mm} mm"
        if nodule is largest:
            _save_shot(study, "viewer-sr.png")


def _seg_frames(seg: Dataset, segment: int) -> dict[float, npt.NDArray[np.bool_]]:
    """The segment's mask per frame, by the frame's position along the slice normal."""
    frames: dict[float, npt.NDArray[np.bool_]] = {}
    normal = _normal(seg)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns)).astype(bool)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        # With one segment, the segment identification is shared by all frames.
        identification = item if "SegmentIdentificationSequence" in item else shared
        number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number == segment:
            position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
            frames[round(float(position @ normal), 2)] = pixels[index]
    return frames


def _normal(dataset: Dataset) -> npt.NDArray[np.float64]:
    if "SharedFunctionalGroupsSequence" in dataset:
        orientation_item = dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        orientation = np.asarray(orientation_item.ImageOrientationPatient, dtype=np.float64)
    else:
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    return np.cross(orientation[:3], orientation[3:])


def test_seg_overlay_lies_on_the_nodule_on_the_same_slice(study_in_viewer: StudyInViewer) -> None:
    """The SEG, opened and loaded as a user does, is an overlay with one segment per nodule, labelled as
    in the SEG. On the slice of each nodule's SR outline, hiding that one segment removes overlay pixels
    exactly where the SEG's own frame for that slice puts the nodule (centre within 1.5 mm, same area),
    inside the SR outline, and over tissue brighter than lung: not shifted, not flipped, not elsewhere."""
    study = study_in_viewer
    driver = study.driver
    _open_study(study)
    _open_series(driver, "CAD nodules SEG")
    _click(driver, "//*[@data-cy='viewport-notification']//button[normalize-space()='Yes']")
    labels = wait_until(
        lambda: driver.execute_script(
            "const s = window.services.segmentationService.getSegmentations();"
            "return s.length ? Object.values(s[0].segments).map(x => x.label) : null;"
        ),
        UI_TIMEOUT_S,
        what="the segmentation loaded",
    )
    segment_labels = [str(item.SegmentLabel) for item in study.seg.SegmentSequence]
    assert sorted(labels) == sorted(segment_labels)
    segmentation_id, viewport_id = driver.execute_script(
        "return [window.services.segmentationService.getSegmentations()[0].segmentationId,"
        " window.services.viewportGridService.getActiveViewportId()];"
    )
    wait_until(
        lambda: driver.execute_script(
            "return window.services.segmentationService.getSegmentationRepresentations(arguments[0]).length",
            viewport_id,
        ),
        UI_TIMEOUT_S,
        what="the segmentation shown in the viewport",
    )
    time.sleep(1.0)

    by_uid = {str(item.TrackingUID): int(item.SegmentNumber) for item in study.seg.SegmentSequence}
    largest = max(study.nodules, key=lambda n: np.ptp(n.outline_mm, axis=0).max())
    for nodule in study.nodules:
        segment = by_uid[nodule.tracking_uid]
        image = study.ct[nodule.sop_instance_uid]
        _show_image(driver, nodule.sop_instance_uid)
        with_overlay = _viewport_png(driver)
        _segment_visible(driver, viewport_id, segmentation_id, segment, False)
        without = _viewport_png(driver)
        _segment_visible(driver, viewport_id, segmentation_id, segment, True)
        overlay = np.abs(with_overlay.astype(int) - without.astype(int)).sum(axis=2) > 30
        overlay &= _on_image(driver, image, overlay.shape)  # not the slice scrollbar's segment marks
        name = nodule.tracking_id.split(":")[-1].replace(" ", "-").lower()
        Image.fromarray(with_overlay).save(study.shots / f"seg-{name}-shown.png")
        Image.fromarray(without).save(study.shots / f"seg-{name}-hidden.png")
        assert overlay.sum() > 0, f"{nodule.tracking_id}: no overlay on its outline's slice"

        position = np.asarray(image.ImagePositionPatient, dtype=np.float64) @ _normal(study.seg)
        mask = _seg_frames(study.seg, segment).get(round(float(position), 2))
        assert mask is not None and mask.any(), f"{nodule.tracking_id}: the SEG has no frame on its slice"
        rows, columns = np.nonzero(mask)
        seg_mm = _pixel_to_patient(image, np.stack([columns + 0.5, rows + 0.5], axis=1).astype(np.float64))
        expected = _to_canvas(driver, seg_mm)
        scale = _canvas_px_per_mm(driver, seg_mm[0], image)
        ys, xs = np.nonzero(overlay)
        shift_mm = np.linalg.norm(np.array([xs.mean(), ys.mean()]) - expected.mean(axis=0)) / scale
        assert shift_mm < TOLERANCE_MM, (
            f"{nodule.tracking_id}: overlay {shift_mm:.1f} mm from the SEG's nodule"
        )
        seg_area_px = mask.sum() * np.prod([float(v) for v in image.PixelSpacing]) * scale**2
        assert 0.4 < overlay.sum() / seg_area_px < 2.5, f"{nodule.tracking_id}: overlay area differs"
        outline = _to_canvas(driver, nodule.outline_mm)
        assert _inside(outline, np.array([xs.mean(), ys.mean()])), (
            f"{nodule.tracking_id}: outside its outline"
        )
        lung_grey = (-700.0 - (-600.0 - 800.0)) / 1600.0 * 255.0  # W 1600 / L -600, OHIF's CT preset
        assert without[overlay].mean() > lung_grey, f"{nodule.tracking_id}: the overlay is not on tissue"
        if nodule is largest:
            _save_shot(study, "viewer-seg.png")
            for beyond in _slices_beyond(study.ct, set(_seg_frames(study.seg, segment)), _normal(study.seg)):
                _show_image(driver, beyond)
                _segment_visible(driver, viewport_id, segmentation_id, segment, True)
                shown = _viewport_png(driver)
                _segment_visible(driver, viewport_id, segmentation_id, segment, False)
                hidden = _viewport_png(driver)
                _segment_visible(driver, viewport_id, segmentation_id, segment, True)
                changed = np.abs(shown.astype(int) - hidden.astype(int)).sum(axis=2) > 30
                changed &= _on_image(driver, study.ct[beyond], changed.shape)
                assert not changed.any(), f"{nodule.tracking_id}: overlay on a slice the SEG leaves empty"


def _slices_beyond(
    ct: dict[str, Dataset], positions: set[float], normal: npt.NDArray[np.float64]
) -> list[str]:
    """The CT slices just below and just above the segment's frames (where its overlay must end)."""
    along = sorted(
        (float(np.asarray(h.ImagePositionPatient, dtype=np.float64) @ normal), sop) for sop, h in ct.items()
    )
    inside = [k for k, (position, _) in enumerate(along) if round(position, 2) in positions]
    return [along[k][1] for k in (min(inside) - 1, max(inside) + 1) if 0 <= k < len(along)]


def _on_image(driver: Any, image: Dataset, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """Where the image lies on the viewport's canvas."""
    corners = np.array([[0, 0], [int(image.Columns), int(image.Rows)]], dtype=np.float64)
    (left, top), (right, bottom) = np.sort(_to_canvas(driver, _pixel_to_patient(image, corners)), axis=0)
    rows, columns = np.indices(shape[:2])
    return (columns >= left) & (columns <= right) & (rows >= top) & (rows <= bottom)


def _wait_for_viewport(driver: Any) -> None:
    """Until OHIF's viewport holds its images (it replaces the viewport when it opens a series)."""
    script = f"try {{ return {_VIEWPORT}.getImageIds().length > 0; }} catch (e) {{ return false; }}"
    wait_until(lambda: driver.execute_script(script), UI_TIMEOUT_S, what="the viewport ready")


def _show_image(driver: Any, sop_instance_uid: str) -> None:
    """Scrolls the viewport to the image, as the mouse wheel would."""
    _wait_for_viewport(driver)
    driver.execute_script(
        f"""const vp = {_VIEWPORT};
        const index = vp.getImageIds().findIndex(id => id.includes('/instances/' + arguments[0] + '/'));
        return vp.setImageIdIndex(index);""",
        sop_instance_uid,
    )
    wait_until(lambda: _current_sop(driver) == sop_instance_uid, UI_TIMEOUT_S, what="the slice on screen")
    time.sleep(1.0)


def _segment_visible(
    driver: Any, viewport_id: str, segmentation_id: str, segment: int, visible: bool
) -> None:
    driver.execute_script(
        "window.services.segmentationService.setSegmentVisibility(...arguments);",
        viewport_id,
        segmentation_id,
        segment,
        visible,
    )
    time.sleep(1.0)


def _inside(polygon: npt.NDArray[np.float64], point: npt.NDArray[np.float64]) -> bool:
    """Even-odd rule."""
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def test_measurement_panel_lists_the_sr_nodules(study_in_viewer: StudyInViewer) -> None:
    """LOAD on the SR puts one measurement per nodule into OHIF's measurement panel, labelled with the
    SR's caption ("Nodule N: type, Lung-RADS category (suggestion)"), on the SR's source image, with the
    SR's outline (centre and extent within 1.5 mm), listed once each in the panel's rows."""
    study = study_in_viewer
    driver = study.driver
    _open_study(study)
    _open_series(driver, "CAD nodules SR")
    script = "return window.services.displaySetService.getActiveDisplaySets()"
    script += ".some(d => d.isLoaded && d.Modality === 'SR')"
    wait_until(lambda: driver.execute_script(script), UI_TIMEOUT_S, what="the SR loaded")
    # OHIF asks whether to track the SR's measurements (or, once asked, offers LOAD on the SR's badge).
    track = "//*[@data-cy='viewport-notification']//button[normalize-space()='Yes']"
    load = "//*[starts-with(@data-cy, 'ModalityLoadBadge')]//*[normalize-space()='LOAD']"
    _click(driver, f"{track} | {load}")
    measurements = wait_until(
        lambda: _panel_measurements(driver, len(study.nodules)), UI_TIMEOUT_S, what="the nodules loaded"
    )
    assert sorted(m["label"] for m in measurements) == sorted(n.caption for n in study.nodules)
    if not driver.find_elements(_by("CSS_SELECTOR"), "[data-cy^='measurement-table-row-']"):
        _click(driver, "[data-cy='trackedMeasurements-btn']")  # the right-hand panel, if it is closed
    rows = wait_until(
        lambda: [
            r.text
            for r in driver.find_elements(_by("CSS_SELECTOR"), "[data-cy^='measurement-table-row-']")
            if r.is_displayed()
        ]
        or None,
        UI_TIMEOUT_S,
        what="the measurement panel's rows",
    )
    assert len(rows) == len(study.nodules), rows
    for nodule in study.nodules:
        assert sum(nodule.caption in row for row in rows) == 1, (nodule.caption, rows)
    by_label = {m["label"]: m for m in measurements}
    largest = max(study.nodules, key=lambda n: np.ptp(n.outline_mm, axis=0).max())
    for nodule in study.nodules:
        measurement = by_label[nodule.caption]
        assert f"/instances/{nodule.sop_instance_uid}/" in measurement["imageId"], nodule.caption
        points = np.asarray(measurement["points"], dtype=np.float64)
        shift_mm = np.linalg.norm(points.mean(axis=0) - nodule.outline_mm[:-1].mean(axis=0))
        extent_mm = np.abs(np.ptp(points, axis=0) - np.ptp(nodule.outline_mm, axis=0))
        assert shift_mm < TOLERANCE_MM, f"{nodule.caption}: loaded {shift_mm:.1f} mm off the SR outline"
        assert extent_mm.max() < TOLERANCE_MM, f"{nodule.caption}: size differs by {extent_mm} mm"
    _show_image(driver, largest.sop_instance_uid)
    _render_annotations(driver)
    _save_shot(study, "viewer-panel.png")


def _panel_measurements(driver: Any, expected: int) -> list[dict[str, Any]] | None:
    """OHIF's measurements (its panel's rows): label, image and outline (patient coordinates)."""
    found = driver.execute_script(
        """return window.services.measurementService.getMeasurements().map(m => ({
            label: m.label, imageId: m.referencedImageId || '',
            points: (m.points && m.points.length ? m.points : (m.data && m.data.contour
                     ? m.data.contour.polyline : [])).map(p => Array.from(p)),
        }));"""
    )
    return found if len(found) >= expected else None
