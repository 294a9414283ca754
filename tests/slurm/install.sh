#!/usr/bin/env bash
# Install the packages a single-node SLURM test cluster needs (Debian/Ubuntu, as root).
# --no-install-recommends keeps it to ~8 packages instead of ~43 (see notes/local-slurm.md).
# Exits non-zero if apt fails or the daemons are still missing afterwards.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (apt-get install)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge; then
    echo "install.sh: apt-get install failed; retrying after apt-get update" >&2
    apt-get update
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
fi

for cmd in slurmctld slurmd sbatch squeue sinfo munged munge; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        echo "install.sh: $cmd not found after install" >&2
        exit 1
    fi
done
echo "install.sh: SLURM packages installed ($(dpkg-query -W -f='${Version}' slurmctld))"
