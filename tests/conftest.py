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


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_torch_compile():
    """Each test compiles from a clean torch.compile state. Dynamo remembers the shapes a function was
    compiled for across tests: after test_compile's clip.py runs, a later eff.py --compile test saw
    its block loop's sizes as dynamic and spent over 20 minutes in inductor's symbolic simplification
    (12 s alone)."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
