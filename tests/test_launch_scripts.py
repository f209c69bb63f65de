"""The cluster launch files in ``launch/``: the SLURM script parses, the hostfile is well-formed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SBATCH = REPO / "launch" / "slurm_torchrun.sbatch"
HOSTFILE = REPO / "launch" / "hostfile.example"
_HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9._-]*)\s+slots=(?P<slots>[1-9][0-9]*)$")


def parse_hostfile(path: Path) -> dict[str, int]:
    """``{host: slots}`` of a DeepSpeed hostfile; raises ``ValueError`` on a malformed line."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected '<host> slots=<N>', got {raw!r}")
        if match["host"] in hosts:
            raise ValueError(f"{path}:{number}: host {match['host']} listed twice")
        hosts[match["host"]] = int(match["slots"])
    return hosts


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_script_runs_elastic_torchrun_with_auto_resume() -> None:
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=" in text and "#SBATCH --ntasks-per-node=1" in text
    for needle in ("srun", "--nnodes=\"${SLURM_NNODES}\"", "--nproc_per_node=\"${GPUS}\"",
                   "--rdzv_backend=c10d", "--rdzv_endpoint=\"${head}:${PORT}\"", "--max-restarts=",
                   "launch/train.py", "+experiment=", "mode=\"${MODE}\"", "hydra.run.dir=", "resume=auto"):
        assert needle in text, needle


def test_sbatch_default_experiment_exists() -> None:
    match = re.search(r"EXPERIMENT=\$\{EXPERIMENT:-([A-Za-z0-9_]+)\}", SBATCH.read_text())
    assert match is not None
    assert (REPO / "configs" / "experiment" / f"{match[1]}.yaml").is_file()


def test_hostfile_parses() -> None:
    hosts = parse_hostfile(HOSTFILE)
    assert hosts and all(slots >= 1 for slots in hosts.values())
