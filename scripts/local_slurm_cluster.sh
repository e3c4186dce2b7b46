#!/bin/bash
# A real SLURM cluster of two nodes on this host (loopback), to try the sbatch script without a cluster.
#   sudo scripts/local_slurm_cluster.sh start /tmp/slurm     # prints `export SLURM_CONF=...`
#   export SLURM_CONF=/tmp/slurm/slurm.conf
#   sbatch --wait --gpus-per-node=0 --cpus-per-task=1 --export=ALL,GPUS_PER_NODE=1,OMP_NUM_THREADS=1 \
#       accelerate_configs/slurm_multi_node.sbatch example_configs/demo_cpu.json
#   sudo scripts/local_slurm_cluster.sh stop /tmp/slurm      # ends every daemon and job of that cluster
# Runs as root (slurmd starts the jobs); installs Debian's slurm-wlm and munge with apt-get when
# missing. Everything (config, munge key, state, logs under log/) lives in the folder; the ports
# are free ones chosen at start. NODES (default 2) sets the number of nodes.
set -euo pipefail
action=${1:?usage: local_slurm_cluster.sh start|stop FOLDER}
folder=${2:?usage: local_slurm_cluster.sh start|stop FOLDER}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ -x "$here/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$here/.venv/bin/python"; fi
exec "$python" "$here/tests/slurm_cluster.py" "$action" "$folder" "${NODES:-2}"
