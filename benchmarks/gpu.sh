#!/usr/bin/env bash
# The GPU checks and measurements of issue 12 (item 7), in one pass on a lent GPU machine.
#
#   bash benchmarks/gpu.sh [OUT]      # OUT: where results go (default gpu-results/)
#
# Data first, here: python benchmarks/gpu_data.py (writes .gpu/); carry .gpu and .whl.
# Runs from the repository root with the machine's own python3 (torch with CUDA) and
# atomlens from src/. Packages that machine lacks (ASE, vesin; SchNetPack and its imports)
# are installed from wheels in .whl/ when that folder is present. Steps, each bounded:
#   1. tests/test_gpu.py: calculator (eager, CUDA graphs), periodic stress, batched MD,
#      training gradients and the train command on the GPU against the CPU;
#   2. benchmarks/md_speed.py --device cuda: energy+force training and MD steps/s on
#      aspirin, atomlens and SchNetPack, 32 and 1024 trajectories at once;
#   3. benchmarks/qm9.py --throughput --device cuda: QM9 training and inference, both
#      libraries at batch size 100, then atomlens alone at 1000;
#   4. (STEPS=variants) benchmarks/gpu_variants.py: SchNet's code paths, model step alone;
#   5. (STEPS=accuracy) time to accuracy on the GPU: QM9 U0 (10,000 training molecules of
#      the 20,000-molecule subset), atomlens alone, GPU_TRAIN_MINUTES (default 3) minutes.
# STEPS (default "tests md qm9", about 8 minutes on an H200) picks them: a 15-minute device
# budget fits the default in one call and "variants accuracy" in a second.
# Every result is one JSON line in OUT/*.jsonl; OUT/log.txt has the times and errors.
# (PY, DEVICE, THREADS, REPLICAS and WHEELS=0 let the script be tried on a CPU machine:
# PY=.venv/bin/python DEVICE=cpu THREADS=2 REPLICAS=4 WHEELS=0 bash benchmarks/gpu.sh /tmp/try)
set -u
OUT=${1:-${OUT:-gpu-results}}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}
REPLICAS=${REPLICAS:-32 1024}
STEPS=" ${STEPS:-tests md qm9} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
if [ -d .whl ] && [ "${WHEELS:-1}" != 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$OUT/log.txt" 2>&1 || log "wheel install failed"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, ase, vesin; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0), 'ase', ase.__version__)" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" | tee -a "$OUT/log.txt"

if want tests; then
log "1. tests/test_gpu.py"
[ "$DEVICE" = cpu ] && export ATOMLENS_TEST_DEVICE=cpu
timeout "${GPU_TEST_SECONDS:-240}" $PY -m pytest -p no:cacheprovider tests/test_gpu.py \
  -rA --tb=short >"$OUT/tests.txt" 2>&1
log "tests exit $?: $(grep -cE '^PASSED' "$OUT/tests.txt") passed; $(grep -E '^(FAILED|ERROR)' "$OUT/tests.txt" | head -5)"

fi

if want md; then
log "2. md_speed.py --device $DEVICE"
timeout "${GPU_MD_SECONDS:-210}" $PY benchmarks/md_speed.py --data .gpu --device "$DEVICE" \
  --threads "$THREADS" \
  --batch-sizes 10 32 100 --seconds 3 --md-steps 200 --replicas $REPLICAS \
  --peer-python "${PEER_PY:-$PY}" >"$OUT/md_speed.jsonl" 2>"$OUT/md_speed.err"
log "md_speed exit $?: $(wc -l <"$OUT/md_speed.jsonl") lines; $(grep -E 'Error|error' "$OUT/md_speed.err" | tail -3)"

fi

if want qm9; then
log "3. qm9.py --throughput --device $DEVICE"
timeout "${GPU_QM9_SECONDS:-120}" $PY benchmarks/qm9.py --throughput --peers --device "$DEVICE" \
  --data .gpu/qm9-20k --n-molecules 5000 --repeats 2 --seconds 2 --threads "$THREADS" \
  --batch-size 100 --peer-python "${PEER_PY:-$PY}" >"$OUT/qm9.jsonl" 2>"$OUT/qm9.err"
log "qm9 (100) exit $?: $(wc -l <"$OUT/qm9.jsonl") lines; $(grep -E 'Error|error' "$OUT/qm9.err" | tail -3)"
timeout "${GPU_QM9_BIG_SECONDS:-50}" $PY benchmarks/qm9.py --throughput --device "$DEVICE" \
  --data .gpu/qm9-20k --n-molecules 5000 --repeats 1 --seconds 2 --threads "$THREADS" \
  --batch-size 1000 --settings 128/6 >"$OUT/qm9_1000.jsonl" 2>"$OUT/qm9_1000.err"
log "qm9 (1000) exit $?: $(wc -l <"$OUT/qm9_1000.jsonl") lines"
fi

if want variants; then
log "4. gpu_variants.py --device $DEVICE"
timeout "${GPU_VARIANTS_SECONDS:-150}" $PY benchmarks/gpu_variants.py --data .gpu/qm9-20k \
  --device "$DEVICE" --seconds 2 >"$OUT/variants.txt" 2>"$OUT/variants.err"
log "variants exit $?: $(grep -c '^{"variant' "$OUT/variants.txt") lines"
fi

if want accuracy; then
log "5. qm9.py time to accuracy on $DEVICE, ${GPU_TRAIN_MINUTES:-3} minutes"
timeout "$(( ${GPU_TRAIN_MINUTES:-3} * 60 + 120 ))" $PY benchmarks/qm9.py --data .gpu/qm9-20k \
  --device "$DEVICE" --n-train 10000 --n-val 1000 --minutes "${GPU_TRAIN_MINUTES:-3}" \
  --threads "$THREADS" --out "$OUT/qm9-train" >"$OUT/accuracy.jsonl" 2>"$OUT/accuracy.err"
log "accuracy exit $?: $(cut -c1-300 "$OUT/accuracy.jsonl")"
fi
