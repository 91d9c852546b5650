"""vwt: training-free sequence compression of vision transformers.

One block loop (``vwt.encoder``) runs every method on every supported model family:

    import vwt
    vwt.patch(model, vwt.InterImage(vocab, thresh=0.1), vwt.ToMe(r=8))
    ...
    vwt.unpatch(model)
"""
from .batching import buckets
from .encoder import Reducer, TokenState
from .merge import EViT, LGTM, ToMe
from .patch import patch, stats, token_stats, token_summary, unpatch
from .quant import quantize
from .resize import Resize
from .tokenizer import InterImage, IntraImage
from .vocab import Vocabulary

__all__ = ["patch", "unpatch", "stats", "token_stats", "token_summary", "IntraImage", "InterImage", "Resize", "ToMe", "EViT", "LGTM",
           "Vocabulary", "quantize", "Reducer", "TokenState", "buckets"]
__version__ = "0.1.0"
