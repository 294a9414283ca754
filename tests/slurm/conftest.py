"""A real single-node SLURM cluster for tests that submit job arrays (`slurm_cluster`).

The cluster is started once per session by tests/slurm/localslurm.sh in a temporary directory
and stopped at the end. Tests skip, with the reason shown, where SLURM is not installed
(run tests/slurm/install.sh as root) or where we are not root. Job scripts run as root with a
plain PATH, so they must name programs by absolute path (e.g. `sys.executable`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "localslurm.sh"
# States a job (or array task) never leaves (squeue keeps them for MinJobAge=3600 s).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real local SLURM cluster (slurm_cluster)")


class SlurmCluster:
    """Handle on the running cluster: `.env` for subprocesses, submit/states/wait/cancel."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.jobs_dir = directory / "jobs"  # sbatch's cwd, so slurm-*.out never land in the repo
        self.jobs_dir.mkdir(exist_ok=True)
        # A clean SLURM environment: an outer allocation's SLURM_*/SBATCH_* variables would
        # change what sbatch and squeue do (or which cluster they talk to).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SALLOC_", "SRUN_"))}
        env["SLURM_CONF"] = str(directory / "slurm.conf")
        self.env = env
        self._count = 0

    def _run(self, *args: str, timeout: float = 30) -> str:
        proc = subprocess.run(args, env=self.env, cwd=self.jobs_dir, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}\n{self.log_tail()}")
        return proc.stdout

    def submit(self, script_text: str, *sbatch_args: str) -> str:
        """Submit a batch script (a `#!` line first; #SBATCH lines allowed); return the job id.

        Extra arguments go to sbatch before the script (e.g. "--array=0-3%2",
        "--dependency=afterok:12"). Output files default to `self.jobs_dir`.
        """
        self._count += 1
        path = self.jobs_dir / f"job{self._count:03d}.sh"
        path.write_text(script_text)
        out = self._run("sbatch", "--parsable", *sbatch_args, str(path)).strip()
        return out.split(";")[0]  # "ID" or "ID;cluster"

    def states(self, job_ids) -> dict[str, tuple[str, str]]:
        """{job or array-task id: (state, reason)} now, one entry per array task ("12_3")."""
        ids = [job_ids] if isinstance(job_ids, (str, int)) else list(job_ids)
        out = self._run("squeue", "-h", "-r", "-t", "all", "-j", ",".join(map(str, ids)),
                        "-o", "%i %T %r")
        result = {}
        for line in out.splitlines():
            task, state, reason = (line.split(None, 2) + ["", ""])[:3]
            result[task] = (state, reason)
        return result

    def wait(self, job_ids, timeout: float = 60, poll: float = 0.2) -> dict[str, str]:
        """Wait until every job/array task is in a final state; return {task id: state}.

        Raises TimeoutError (with the current states and the daemons' logs) otherwise; note a
        job whose dependency can never be satisfied stays PENDING and so times out here.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = self.states(job_ids)
            if now and all(state in FINAL_STATES for state, _ in now.values()):
                return {task: state for task, (state, _) in now.items()}
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {job_ids} not finished after {timeout}s: {now}\n"
                                   f"{self.log_tail()}")
            time.sleep(poll)

    def cancel(self, job_ids) -> None:
        ids = [job_ids] if isinstance(job_ids, (str, int)) else list(job_ids)
        self._run("scancel", *map(str, ids))

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.dir / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


def _missing() -> str | None:
    """Why the cluster cannot run here, or None."""
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for cmd in ("sbatch", "squeue", "slurmctld", "slurmd", "munged"):
        if shutil.which(cmd, path=sbin) is None:
            return f"SLURM not installed ({cmd} not found): run tests/slurm/install.sh as root"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (SlurmUser=root, munged)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(SCRIPT), "start", str(directory)], capture_output=True,
                           text=True, timeout=180)
    if start.returncode != 0:
        pytest.fail(f"localslurm.sh start failed ({start.returncode}):\n{start.stderr}",
                    pytrace=False)
    try:
        yield SlurmCluster(directory)
    finally:
        stop = subprocess.run(["bash", str(SCRIPT), "stop", str(directory)],
                              capture_output=True, text=True, timeout=120)
        if stop.returncode != 0:
            print(f"localslurm.sh stop failed ({stop.returncode}):\n{stop.stderr}")
