"""Tiny CLIP and BLIP models and tiny data sets (Waterbirds, COCO) in one folder, for the GPU check's
clip.py and blip.py steps (benchmarks/gpu_check.sh): the same ones the tests write (tests/fixtures.py),
so the check needs no hub and no data download.

    python benchmarks/gpu_fixtures.py DIR     # DIR/tiny-clip, DIR/tiny-blip, DIR/data/, DIR/vocab.pt

The tiny CLIP's 16-word vocabulary is learned on the sample photographs by the paper's recipe
(scikit-learn: the GPU machine may lack FAISS).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import fixtures  # noqa: E402
import torch  # noqa: E402

import vwt  # noqa: E402
from vwt import datasets, models  # noqa: E402
from vwt.flops import dims_of  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_fixtures.py DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    clip, _ = fixtures.save_tiny_models(out)
    vision = models.load_model(str(clip), torch.device("cpu")).vision
    prep = datasets.preprocess_for(vision)
    samples = datasets.Samples(prep)
    photos = torch.stack([samples[i][0] for i in range(len(samples))])
    vwt.Vocabulary.learn_paper([photos], size=16, patch_size=dims_of(vision).patch_size, data="samples",
                               image_size=prep.size, mean=list(prep.mean), std=list(prep.std)).save(out)
    fixtures.write_waterbirds(out / "data")
    fixtures.write_coco(out / "data")
    print(f"tiny models and data sets: {out}")


if __name__ == "__main__":
    main()
