"""Visual-word vocabularies (placeholder until the tokenizer issue lands)."""


class Vocabulary:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("vwt.Vocabulary is not implemented yet")
