"""The instance store's disk watermark: when free disk runs low, new studies are refused first.

Two levels. Below the watermark (`min_free_disk_mb`) the listener refuses instances of *new* studies,
while a study already being received may finish: a hospital would rather have a study in progress
complete than cut in half, with the PACS holding the rest. Below the hard floor (`disk_floor_mb`, never
above the watermark) every instance is refused, so that the disk the job database and the operating
system share never fills. Either refusal reaches the sender as a failure status before anything is
written, and the log says which level was crossed.
"""

from __future__ import annotations

from dataclasses import dataclass

from cad_node.instance_store import StoreError
from cad_node.settings import Settings

MB = 1024 * 1024


class DiskFullError(StoreError):
    """An instance refused before anything was written: too little free disk."""


@dataclass(frozen=True)
class DiskWatermark:
    watermark_bytes: int
    floor_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DiskWatermark:
        watermark = settings.min_free_disk_mb * MB
        return cls(watermark_bytes=watermark, floor_bytes=min(settings.disk_floor_mb * MB, watermark))

    def refusal(self, free_bytes: int, size: int, study_in_progress: bool) -> str | None:
        """Why `size` more bytes are refused with `free_bytes` free; None when they may be written."""
        left = free_bytes - size
        if left < self.floor_bytes:
            return (
                f"{left // MB} MB would be left free, below the hard floor disk_floor_mb = "
                f"{self.floor_bytes // MB} MB: no instance is kept"
            )
        if left < self.watermark_bytes and not study_in_progress:
            return (
                f"{left // MB} MB would be left free, below the watermark min_free_disk_mb = "
                f"{self.watermark_bytes // MB} MB: new studies are refused (studies being received may "
                f"finish down to disk_floor_mb = {self.floor_bytes // MB} MB)"
            )
        return None
