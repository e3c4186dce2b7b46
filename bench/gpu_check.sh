#!/bin/bash
# GPU readiness in one go (about 8 minutes on one GPU, no network needed), from the repository root:
#   bench/gpu_check.sh                     # run every check; figures go to $OUT (default gpu_check_out/)
#   bench/gpu_check.sh --build-wheelhouse  # on a machine WITH network: fill bench/wheelhouse/ first
#
# The GPU machine has torch and accelerate (and torchvision) installed but no network. The
# project's pure-Python dependencies travel as wheels in bench/wheelhouse/ (built here with
# `pip download --no-deps`, pinned to the versions of this environment, git-ignored) and are
# installed with `pip install --no-deps --no-index`, only those missing. Then, each step under its
# own time limit so one slow step cannot eat the others' time:
#   1. the CUDA-marked tests (tests/test_cuda.py: bf16 and fp16 training, pinned-memory batches,
#      CUDA sampling);
#   2. the train-step benchmark (bench/train_step.py) at 64px and 256px: samples/s, peak memory and
#      model FLOP utilisation, in fp32 / bf16 / bf16 + torch.compile / bf16 + channels_last;
#   3. the data loader feeding the GPU (bench/train.py): the whole training loop with 8 loader
#      workers against the same steps on one batch held on the GPU; a ratio near 1 means the
#      loader keeps the GPU busy.
# Every figure is printed and kept under $OUT (results.jsonl, *.log); the exit status is that of
# the CUDA tests.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-bench/wheelhouse}
OUT=${OUT:-gpu_check_out}
# Pure-Python packages the package and its tests import, beyond torch, torchvision and accelerate.
WHEELS="attrs cattrs webdataset braceexpand einops torchmetrics lightning-utilities torch-fidelity tqdm fsspec
pytest pytest-timeout iniconfig pluggy typing-extensions exceptiongroup"

if [ "${1:-}" = "--build-wheelhouse" ]; then
    mkdir -p "$WHEELHOUSE"
    for name in $WHEELS; do
        version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null)
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELHOUSE" "$name${version:+==$version}" ||
            echo "warning: no wheel for $name"
    done
    ls -l "$WHEELHOUSE"
    exit 0
fi

mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
"$PYTHON" - <<'EOF' || { echo "error: torch with CUDA is needed"; exit 2; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("bf16 supported", torch.cuda.is_bf16_supported())
EOF
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv 2>/dev/null || true

step "installing missing pure-Python packages from $WHEELHOUSE (--no-deps, no network)"
missing=""
for name in $WHEELS; do
    "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "missing:$missing"
    if [ -d "$WHEELHOUSE" ]; then
        "$PYTHON" -m pip install --quiet --no-deps --no-index --find-links "$WHEELHOUSE" $missing ||
            echo "warning: some packages could not be installed from $WHEELHOUSE"
    else
        echo "warning: no $WHEELHOUSE folder (build it with bench/gpu_check.sh --build-wheelhouse where there is network)"
    fi
fi

step "1. CUDA tests"
timeout 180 "$PYTHON" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider --timeout=170 2>&1 | tee "$OUT/cuda_tests.log"
tests_status=${PIPESTATUS[0]}

step "2. train-step benchmark: fp32 / bf16 / bf16 + torch.compile / bf16 + channels_last at 64px and 256px"
bench() {
    timeout "$1" "$PYTHON" bench/train_step.py --device cuda --only ours --steps 20 --repeats 1 \
        --configs "64px GPU" "256px GPU" --json "$OUT/results.jsonl" "${@:2}" 2>&1 | tee -a "$OUT/train_step.log"
}
bench 60
bench 60 --amp
bench 150 --amp --compile
bench 60 --amp --channels-last

step "3. data loader feeding the GPU: 8 workers, whole loop against compute alone"
if [ ! -f "$OUT/demo64/data_config.json" ]; then
    timeout 90 "$PYTHON" -m dalle2_decoder.data.demo --out "$OUT/demo64" --num-images 3000 --image-size 64 \
        --embed-dim 768 --shard-size 250 > "$OUT/demo.log" 2>&1
fi
cat > "$OUT/loader64.json" <<EOF
{
    "decoder": {"unets": [{"dim": 128, "image_embed_dim": 768, "cond_dim": 128, "dim_mults": [1, 2, 3, 4],
                           "self_attn": [false, true, true, true], "attn_dim_head": 32, "attn_heads": 8}],
                "image_sizes": [64], "timesteps": 1000},
    "data": {"webdataset_base_url": "$OUT/demo64/shards/{}.tar", "img_embeddings_url": "$OUT/demo64/img_emb",
             "num_workers": 8, "batch_size": 64, "start_shard": 0, "end_shard": 11,
             "splits": {"train": 0.75, "val": 0.125, "test": 0.125}, "preprocessing": {"ToTensor": true}},
    "train": {"epochs": 1, "device": "cuda", "mixed_precision": "bf16", "n_sample_images": 2},
    "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local", "save_latest_to": "latest.pth"}}
}
EOF
timeout 150 "$PYTHON" bench/train.py --config "$OUT/loader64.json" --steps 30 --warmup 5 2>&1 | tee "$OUT/loader.log"

step "done: figures in $OUT/ (results.jsonl, train_step.log, loader.log, cuda_tests.log)"
exit "$tests_status"
