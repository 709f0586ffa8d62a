"""The shift-and-stitch heatmap of benchmarks/detector_scales.py: every voxel of it is the cell of the
detector's pass on the sampling phase that voxel falls on."""

from __future__ import annotations

import numpy as np
import torch

from models.networks import CandidateDetector, DetectorConfig, predict_heatmap
from models.preprocessing import normalise
from tests.benchmark_scripts import load_benchmark


def test_the_stitched_heatmap_interleaves_the_eight_sampling_phases() -> None:
    load_benchmark("inference_variants")  # which the script imports as its neighbour
    scales = load_benchmark("detector_scales")
    torch.manual_seed(0)
    detector = CandidateDetector(DetectorConfig((4, 8, 8))).eval()
    hu = np.random.default_rng(0).normal(-700.0, 200.0, (24, 22, 21)).astype(np.float32)
    box = (slice(2, 20), slice(1, 20), slice(0, 19))  # even and odd sizes; the last phase reaches the edge
    phases = scales.phase_heatmaps(detector, hu, box)
    assert sorted(phases) == [(k, j, i) for k in (0, 1) for j in (0, 1) for i in (0, 1)]
    stitched = scales.stitch(phases, [s.stop - s.start for s in box])
    assert stitched.shape == (18, 19, 19)

    unshifted = predict_heatmap(detector, normalise(hu[box]))
    np.testing.assert_array_equal(stitched[::2, ::2, ::2], unshifted)
    corner, moved = phases[(1, 1, 1)]
    assert moved == (slice(3, 21), slice(2, 21), slice(1, 20))
    np.testing.assert_array_equal(corner, predict_heatmap(detector, normalise(hu[moved])))
    np.testing.assert_array_equal(stitched[1::2, 1::2, 1::2], corner[:9, :9, :9])
    heat, _ = phases[(0, 1, 0)]
    np.testing.assert_array_equal(stitched[::2, 1::2, ::2], heat[:9, :9, :10])
    assert (stitched > 0).all()  # every voxel filled
