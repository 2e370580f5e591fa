#!/usr/bin/env bash
# GPU figures for the README's benchmark section, on a machine with CUDA:
#   bench/gpu.sh OUT_DIR [MODEL]
# MODEL: an embedded model's name whose GGUF is already in $QVIZ_CACHE (converted here), or a
# model folder. Without it (or if its conversion fails): SmolLM2-135M's architecture, read from
# .dev/smol (its config.json and tokenizer files), with random weights; every figure below
# depends on the shapes, not on the weights' values.
# QVIZ_GPU_BENCHES: the benchmarks to run (default: quant compare trace ui-uncached gptq).
# ui-uncached drives the dashboard's own views, so it needs Panel and bokeh there (carry their
# wheels, see the device notes); without them it fails alone and the others still run.
# Writes OUT_DIR/log.txt (everything printed) and OUT_DIR/bench.jsonl (one JSON line per bench).
set -u
out=$1
model=${2:-}
log=$out/log.txt
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), 'cpus', torch.get_num_threads())"
} >>"$log" 2>&1
if [ -n "$model" ] && ! timeout 150 python3 -c "import sys; from qviz.models import load_model; \
load_model(sys.argv[1])" "$model" >>"$log" 2>&1; then
    echo "gpu.sh: $model did not load; SmolLM2-135M's shapes with random weights instead" >>"$log"
    model=
fi
if [ -z "$model" ]; then
    model=/tmp/qviz-smol-shapes
    python3 - "$model" >>"$log" 2>&1 <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(".dev/smol"), Path(sys.argv[1])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("random-weight model with SmolLM2-135M's config at", dst)
PY
fi
echo "== model $model" >>"$log"
for b in ${QVIZ_GPU_BENCHES:-quant compare trace ui-uncached gptq}; do
    echo "== qviz bench $b" >>"$log"
    timeout 120 python3 -m qviz.bench "$b" --model "$model" --json >>"$out/bench.jsonl" 2>>"$log" \
        || echo "== qviz bench $b failed: exit $?" >>"$log"
done
