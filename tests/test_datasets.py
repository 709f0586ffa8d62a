"""Building the training shards: the cases of a split, side by side in worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.datasets import CaseSource, default_workers, in_processes


def _write_name(source: CaseSource, path: Path) -> None:
    path.write_text(f"{source.name} in {os.getpid()}")


def test_jobs_run_in_other_processes_and_each_is_reported(tmp_path: Path) -> None:
    sources = [CaseSource("synthetic", seed) for seed in (1, 2, 3)]
    jobs = [(source, tmp_path / f"{source.name}.txt") for source in sources]
    messages: list[str] = []
    in_processes(_write_name, jobs, 2, "writing", messages.append)
    written = [path.read_text() for _, path in jobs]
    assert [text.split(" in ")[0] for text in written] == [s.name for s in sources]
    assert all(int(text.split(" in ")[1]) != os.getpid() for text in written)
    assert messages[0] == "writing 3 cases in 2 processes" and len(messages) == 4
    assert sorted(m.split(":")[0] for m in messages[1:]) == [f"writing {s.name}" for s in sources]
    # one worker: here, in order
    in_processes(_write_name, jobs[:2], 1, "writing", messages.append)
    assert all(int(path.read_text().split(" in ")[1]) == os.getpid() for _, path in jobs[:2])
    assert messages[-2:] == ["writing synthetic-1 (1/2)", "writing synthetic-2 (2/2)"]


def test_a_failing_job_fails_the_whole_build(tmp_path: Path) -> None:
    jobs = [
        (CaseSource("synthetic", 1), tmp_path / "missing" / "x.txt"),
        (CaseSource("synthetic", 2), tmp_path / "y.txt"),
    ]
    with pytest.raises(FileNotFoundError):
        in_processes(_write_name, jobs, 2, "writing", lambda message: None)


def test_the_default_number_of_workers_fits_the_cores() -> None:
    assert 1 <= default_workers() <= (os.cpu_count() or 1)
