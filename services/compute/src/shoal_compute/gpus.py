"""GPU discovery on a compute node, through ``nvidia-smi``.

The node declares its GPUs (ids handed to the Docker executor as ``gpus=[...]``) and assigns
concrete ones to each execution (``Limits.gpu_ids``); this module only finds what is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

# The query whose output parse_nvidia_smi understands.
NVIDIA_SMI_QUERY = [
    "--query-gpu=index,uuid,name,memory.total",
    "--format=csv,noheader,nounits",
]


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as nvidia-smi reports it."""

    index: int
    uuid: str
    name: str
    memory_mib: int  # total memory; 0 when the driver does not say ("[N/A]")
    vendor: str = "nvidia"


def parse_nvidia_smi(csv_text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits``.

    Blank lines are skipped; a line that is not four fields raises ValueError, because a node that
    silently loses a GPU would under-advertise without anyone noticing.
    """
    gpus: list[GpuInfo] = []
    for lineno, line in enumerate(csv_text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            raise ValueError(f"nvidia-smi line {lineno}: expected 4 fields, got {line!r}")
        # Only the name can contain a comma; index and uuid lead, memory trails.
        index_text, uuid, *name_parts, memory_text = fields
        try:
            index = int(index_text)
        except ValueError:
            raise ValueError(f"nvidia-smi line {lineno}: bad GPU index {index_text!r}") from None
        try:
            memory_mib = int(float(memory_text))
        except ValueError:
            memory_mib = 0
        gpus.append(
            GpuInfo(index=index, uuid=uuid, name=", ".join(name_parts), memory_mib=memory_mib)
        )
    return gpus


def detect_gpus(nvidia_smi: str = "nvidia-smi", timeout: float = 10.0) -> list[GpuInfo]:
    """The GPUs nvidia-smi sees; [] when it is not installed or fails.

    Blocking (it runs a process): call it at node start-up or through ``asyncio.to_thread``.
    """
    path = shutil.which(nvidia_smi)
    if path is None:
        return []
    try:
        done = subprocess.run(
            [path, *NVIDIA_SMI_QUERY],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia_smi_failed", error=str(exc))
        return []
    if done.returncode != 0:
        # Installed without a working driver (common on CPU-only hosts with the utils package).
        log.warning(
            "nvidia_smi_failed", exit_code=done.returncode, stderr=done.stderr.strip()[:500]
        )
        return []
    try:
        return parse_nvidia_smi(done.stdout)
    except ValueError as exc:
        log.warning("nvidia_smi_unparsable", error=str(exc))
        return []
