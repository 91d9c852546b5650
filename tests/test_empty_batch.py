"""A batch of no image: a patched model behaves as the unpatched one, whatever the reducer (issue 23,
item 15). timm and BLIP's vision tower answer an empty batch with empty outputs; patched, every reducer
must too, and :func:`vwt.stats` must describe the empty forward."""
import pytest
import torch

import vwt
from tiny import ENTRIES, IMAGE, PATCH

REDUCERS = {
    "none": lambda: [],
    "intra": lambda: [vwt.IntraImage(drop=0.5)],
    "inter": lambda: [vwt.InterImage(vwt.Vocabulary(torch.randn(20, 3 * PATCH * PATCH), space="pixel",
                                                    patch_size=PATCH), thresh=0.9)],
    "tome": lambda: [vwt.ToMe(r=2)],
    "evit": lambda: [vwt.EViT(keep=0.7, layers=(1, 2))],
    "lgtm": lambda: [vwt.LGTM(r=2)],
    "intra+tome": lambda: [vwt.IntraImage(drop=0.5), vwt.ToMe(r=2)],
}


def _run(entry, model, x):
    try:
        with torch.no_grad():
            return entry(model, x)
    except Exception as e:  # noqa: BLE001 - the unpatched model's own answer, whatever it is
        return e


@pytest.mark.parametrize("reducer", sorted(REDUCERS))
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_a_batch_of_no_image_behaves_as_unpatched(name, reducer):
    torch.manual_seed(0)
    build, entry = ENTRIES[name]
    model = build()
    empty = torch.zeros(0, 3, IMAGE, IMAGE)
    ref = _run(entry, model, empty)
    vwt.patch(model, *REDUCERS[reducer]())
    out = _run(entry, model, empty)
    if isinstance(ref, Exception):  # e.g. HF CLIP and open_clip refuse an empty batch themselves
        assert isinstance(out, Exception)
        return
    assert not isinstance(out, Exception), f"patched with {reducer}: {type(out).__name__}: {out}"
    assert out.shape[0] == 0 and out.dim() == ref.dim()
    st = vwt.stats(model)
    assert st["tokens_per_layer"].shape[0] == 0
    # and the same model still reduces a real batch afterwards
    with torch.no_grad():
        assert entry(model, torch.randn(2, 3, IMAGE, IMAGE)).shape[0] == 2
