"""In-network reducers (placeholder until the baselines issue lands)."""
from .encoder import Reducer


class ToMe(Reducer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("vwt.ToMe is not implemented yet")


class EViT(Reducer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("vwt.EViT is not implemented yet")


class LGTM(Reducer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("vwt.LGTM is not implemented yet")
