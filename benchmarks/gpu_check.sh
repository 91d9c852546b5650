#!/usr/bin/env bash
# The GPU check: everything this project can only measure on an NVIDIA GPU, in one go of about 9 minutes (estimated).
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine: writes results/gpu/<gpu-name>/
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on this CPU, tiny sizes (CI runs it)
#   bash benchmarks/gpu_check.sh --out DIR    # write elsewhere
#
# Steps (each with its own time limit; a failed step is recorded and the next one runs):
#   env      the GPU (name, driver, clocks, power limit, temperature) and the Python packages
#   tests    the CUDA-marked tests (pytest -m cuda)
#   eff      eff.py at batch 1, 8 and 32, every method (base, intra, inter, ToMe, EViT, LGTM and the
#            paper's whole-model int8, --protocol paper), NVML energy, the power trace and the paper's
#            one reading per batch
#   eff-int8 eff.py --protocol standard: base against the vision tower's bitsandbytes int8
#   clip-*   clip.py on the tiny Waterbirds fixture with inter-image + ToMe, float32 and float16
#   blip-*   blip.py on the tiny COCO fixture with inter-image + ToMe, float32 and float16 (captions
#            only: the caption metrics need Java, which the GPU machine may lack)
#   packed   inter-image packed against padded at batch 8, 32 and 128 (benchmarks/bench_packed.py)
#   process  the vocabulary's k-means step on the GPU (vwt.kmeans, torch-cuda) beside scikit-learn at
#            100, 1,000 and 10,000 words, and the ImageNet-1k fit extrapolated from it
#            (benchmarks/bench_process.py --quick, issue #30)
# Then env again (clocks and temperature after the work) and a summary: steps.tsv and summary.txt.
#
# Python: $PYTHON, else python3. Packages the machine lacks come from .gpu-site/ (made by
# benchmarks/gpu_prepare.sh where pip works, for a machine without network), else from the package
# index into a virtual environment beside the machine's own torch. Models have random weights
# (runtime and energy do not depend on them): no model hub is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

dry=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$dry" = 0 ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "error: no CUDA GPU visible to $PY's torch; on a CPU run: bash benchmarks/gpu_check.sh --dry-run" >&2
        exit 2
    fi
    # packages: the carried .gpu-site/ (benchmarks/gpu_prepare.sh), else the index beside the machine's torch
    [ -d .gpu-site ] && export PYTHONPATH="$root/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "import timm, open_clip, transformers, bitsandbytes, pycocotools" 2>/dev/null; then
        grep -vE '^(torch|torchvision)([<>=; ]|$)' requirements.txt >/tmp/vwt-requirements.txt
        if "$PY" -m venv --system-site-packages /tmp/vwt-venv \
                && timeout 240 /tmp/vwt-venv/bin/python -m pip install -q -r /tmp/vwt-requirements.txt; then
            PY=/tmp/vwt-venv/bin/python
        else
            echo "note: packages are missing and the package index did not answer; steps needing them will fail"
        fi
    fi
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    name=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
    out=${out:-results/gpu/$name}
    dev=cuda
    slack=1
else
    out=${out:-runs/gpu_check_dry/cpu}
    dev=cpu
    slack=4  # a shared CPU runs the tiny steps slower than the GPU runs the real ones
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
fix="$out/fixtures"
printf 'step\tstatus\tseconds\n' >"$out/steps.tsv"

step() {  # step NAME SECONDS command...: run with a time limit, log to NAME.log, record the outcome
    local name=$1 limit=$(( $2 * slack )) t0 rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    t0=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    local status=ok
    [ $rc = 124 ] && status="timed out" || { [ $rc != 0 ] && status="failed ($rc)"; }
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >>"$out/steps.tsv"
    [ "$status" = ok ] || { echo "   $status; the end of $out/$name.log:"; tail -5 "$out/$name.log" | sed 's/^/   /'; }
}

environment() {  # environment WHEN: the machine and its GPU now
    {
        echo "when: $1, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "dry run: $dry"
        git -C "$root" log -1 --format='commit: %H %s' 2>/dev/null
        if [ "$dry" = 0 ]; then
            nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,power.draw,temperature.gpu,memory.total --format=csv
        else
            echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) usable cores"
        fi
        "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
        "$PY" -c "
import importlib
for m in ('transformers', 'timm', 'open_clip', 'bitsandbytes', 'accelerate', 'torchao', 'faiss', 'sklearn', 'pycocotools'):
    try:
        print(m, getattr(importlib.import_module(m), '__version__', '?'))
    except Exception as e:
        print(m, 'missing:', type(e).__name__)"
    } >>"$out/environment.txt" 2>&1
}

: >"$out/environment.txt"
environment before
step fixtures 120 "$PY" benchmarks/gpu_fixtures.py "$fix"

if [ "$dry" = 0 ]; then
    # --full: all 12 samples, its warm-ups, and the paper's own runs (50 warm-up calls, one NVML reading
    # after each batch; not at batch 32, which 12 images do not fill)
    sizes=(--full --batch 1 8 32 --rounds 5 --seconds 1)
    tiny=()
    packed=(--batch 8 32 128 --rounds 5)
    process=(--quick --rows 65536)
    few=()
    step tests 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$out/tests.xml"
else
    # a tiny CLIP (patch 8, 32 px: a 16-word vocabulary fits its samples' patches), one short round
    sizes=(--batch 1 2 --rounds 1 --seconds 0.01 --limit 2 --warmup 0 --warmup-seconds 0 --paper-warmup 1 --paper-runs)
    tiny=(--model "$fix/tiny-clip" --vocab 16 --tome 2 --lgtm 2)
    packed=(--batch 2 --rounds 1 --batches 1 --model "$fix/tiny-clip" --vocab 16)
    process=(--quick --words 100 --rows 256 --read-images 2 --seed-words 4 --faiss-words 4)
    few=(--limit 2)
    step tests 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider --co
fi

step eff 300 "$PY" eff.py --device "$dev" --random-weights --methods base,intra,inter,tome,evit,lgtm,int8 \
    "${sizes[@]}" "${tiny[@]}" --out "$out"
step eff-int8 120 "$PY" eff.py --protocol standard --device "$dev" --random-weights --methods base,int8 \
    "${sizes[@]}" ${tiny[@]:+--model "$fix/tiny-clip"} --out "$out"
for dtype in float32 float16; do
    step "clip-$dtype" 60 "$PY" clip.py --model "$fix/tiny-clip" --data waterbirds --data-root "$fix/data" \
        --device "$dev" --dtype "$dtype" --vocab-path "$fix/vocab.pt" --tome 1 --workers 0 --out "$out/clip-$dtype"
    step "blip-$dtype" 60 "$PY" blip.py --model "$fix/tiny-blip" --data coco --data-root "$fix/data" \
        --device "$dev" --dtype "$dtype" --tome 1 --workers 0 --no-score ${few[@]:+"${few[@]}"} --out "$out/blip-$dtype"
done
step packed 150 "$PY" benchmarks/bench_packed.py --device "$dev" "${packed[@]}" --out "$out/bench_packed.json"
step process 180 "$PY" benchmarks/bench_process.py "${process[@]}"

environment after
{
    echo "GPU check ($([ "$dry" = 1 ] && echo 'dry run on the CPU' || echo "$gpu")): $out"
    column -t -s $'\t' "$out/steps.tsv"
    for f in "$out"/eff__*.csv; do
        [ -f "$f" ] || continue
        echo
        echo "$(basename "$f"):"
        "$PY" - "$f" <<'EOF'
import sys
import pandas as pd
df = pd.read_csv(sys.argv[1])
cols = [c for c in ("config", "batch", "tokens_mean", "latency_ms_median", "speedup_median", "speedup_iqr",
                    "energy_j_per_image", "energy_ratio_median", "power_w_mean") if c in df]
print(df[cols].to_string(index=False))
EOF
    done
    if [ -f "$out/process.log" ]; then
        echo
        echo "process (benchmarks/bench_process.py: the k-means step per engine, ImageNet-1k extrapolated):"
        grep -E '^(torch threads|read:|step V=|seeding:|ImageNet|\|)' "$out/process.log"
    fi
} | tee "$out/summary.txt"
! grep -qv $'\tok\t' <(tail -n +2 "$out/steps.tsv")
