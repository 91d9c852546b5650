#!/usr/bin/env bash
# Prepare the GPU check where pip works (this CPU machine), for a GPU machine that reaches no network:
#   .gpu-site/   the packages the GPU machine's image lacks (bitsandbytes for CUDA 13, open_clip with
#                ftfy, pycocotools), unpacked for Python 3.12 on x86-64; bitsandbytes keeps
#                its CUDA 13 libraries only, so the folder stays small enough to travel
#   tokenizers/samples/v1000/   the 1000-word samples vocabulary eff.py and bench_packed.py use
#                (learned here with FAISS, which the GPU machine lacks)
# Both are ignored by git. Then, with the device tool (about 8 minutes of a 15-minute budget):
#   run(command="bash benchmarks/gpu_check.sh; tar czf $OUT/gpu.tgz results/gpu",
#       carry=[".gpu-site", "tokenizers"], timeout_s=570)
# and unpack gpu.tgz into the checkout.
#
#   bash benchmarks/gpu_prepare.sh [PYTHON_VERSION]     # default 3.12, the GPU image's
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pyver=${1:-3.12}
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu-site/' "$exclude" 2>/dev/null || echo '/.gpu-site/' >>"$exclude"
fi
rm -rf .gpu-site
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip install -q --no-deps --only-binary=:all: --no-compile --python-version "$pyver" --implementation cp \
    "${platforms[@]}" --target .gpu-site bitsandbytes open_clip_torch ftfy wcwidth pycocotools
find .gpu-site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda13*.so' ! -name 'libbitsandbytes_cpu.so' -delete
du -sh .gpu-site

HF_HUB_OFFLINE=1 "$PY" -c "
from transformers import CLIPVisionConfig, CLIPVisionModel
from vwt import datasets, vocab_files
vision = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224))  # ViT-B/16's shape and preprocessing
vocab_files.samples_vocabulary(1000, vision, datasets.preprocess_for(vision))"
ls -l tokenizers/samples/v1000/vocab.pt
echo "ready: carry .gpu-site and tokenizers (see the top of this file for the device command)"
