"""int8 quantization (placeholder until the baselines issue lands)."""


def quantize(model, backend="auto"):
    raise NotImplementedError("vwt.quantize is not implemented yet")
