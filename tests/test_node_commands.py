"""The node's commands as a user types them: `cad-node send`, `cad-node demo`, `cad-node config show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.peers import Storescp


def cad_node(*arguments: str, timeout: float = 60, **environment: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAD_NODE_")}
    return subprocess.run(
        [sys.executable, "-m", "cad_node", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **environment},
        check=False,
    )


@pytest.mark.usefixtures("dcmtk")
def test_send_stores_every_file_of_a_folder(lidc_series_dir: Callable[[str], Path]) -> None:
    folder = lidc_series_dir("LIDC-IDRI-0001")  # slices and the readers' XML, which is not DICOM
    with Storescp(ae_title="PACS") as pacs:
        done = cad_node("send", str(folder), "--to", f"PACS@127.0.0.1:{pacs.port}")
        received = pacs.wait_for(133, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "sent 133 of 133 files" in done.stdout
    assert len(received) == 133


def test_send_says_why_when_nobody_listens(lidc_series_dir: Callable[[str], Path]) -> None:
    files = sorted(lidc_series_dir("LIDC-IDRI-0001").glob("*.dcm"))[:2]
    done = cad_node("send", *map(str, files), "--to", "PACS@127.0.0.1:9")
    assert done.returncode != 0
    assert "PACS@127.0.0.1:9 could not be reached" in done.stderr


def test_send_refuses_a_malformed_destination(tmp_path: Path) -> None:
    done = cad_node("send", str(tmp_path), "--to", "PACS:104")
    assert done.returncode == 2 and "AET@HOST:PORT" in done.stderr


def test_config_show_reports_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "FROMFILE"\nport = 4000\ndestinations = ["PACS@10.0.0.5:104"]\n')
    done = cad_node(
        "--config", str(config), "config", "show", "--json",
        CAD_NODE_PORT="4100", CAD_NODE_DATABASE_URL="postgresql+psycopg://cad:secret@db/cad",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["ae_title"], shown["port"]) == ("FROMFILE", 4100)  # the environment beats the file
    assert shown["destinations"] == ["PACS@10.0.0.5:104"]
    assert "secret" not in done.stdout


@pytest.mark.slow
def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    """`cad-node demo` with nothing set up: a synthetic case through the node to a throwaway PACS, the
    nodules reported compared with the truth."""
    done = cad_node("demo", "--out", str(tmp_path / "demo"), "--nodules", "3", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SR and SEG received by the PACS" in done.stderr
    assert "true nodules (ground truth) and what the SR reported:" in done.stdout
    assert "found " in done.stdout and " of 3 nodules" in done.stdout
    assert "encode results" in done.stdout  # the steps, from the job database
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "demo" / "pacs").iterdir()) == [
        "DOC", "KO", "PR", "SEG", "SR",
    ]  # fmt: skip
