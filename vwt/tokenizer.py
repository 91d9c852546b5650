"""Visual Word Tokenizer (placeholder until the tokenizer issue lands)."""
from .encoder import Reducer


class IntraImage(Reducer):
    kind = "input"

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("vwt.IntraImage is not implemented yet")


class InterImage(Reducer):
    kind = "input"

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("vwt.InterImage is not implemented yet")
