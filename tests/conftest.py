import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# The tiny test models are far faster on one thread: a second one mostly waits (and spins when the
# CPU is shared). Scripts and benchmarks keep torch's own choice.
torch.set_num_threads(1)
