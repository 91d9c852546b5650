"""Analytic FLOPs: the formula by hand for one small configuration, and counts read from every backend."""
import pytest
import torch

import vwt
from vwt.flops import TowerDims, dense_flops, dims_of, flops_of_last_forward, tower_flops
from tiny import ENTRIES, HEADS, NUM_PATCHES, PATCH, WIDTH, images, timm_vit


def test_tower_flops_by_hand():
    c, m, p = 8, 32, 2
    dims = TowerDims(width=c, mlp=m, depth=2, heads=2, patch_size=p, num_patches=9)
    tokens = [10, 7, 4]  # enters block 0; after block 0's reduction; after block 1's reduction
    block0 = 2 * 3 * 10 * c * c + 2 * 2 * 10 * 10 * c + 2 * 10 * c * c + 2 * 2 * 7 * c * m
    block1 = 2 * 3 * 7 * c * c + 2 * 2 * 7 * 7 * c + 2 * 7 * c * c + 2 * 2 * 4 * c * m
    embed = 2 * 9 * (3 * p * p) * c
    assert tower_flops(dims, tokens) == block0 + block1 + embed
    per_image = tower_flops(dims, torch.tensor([tokens, [10, 10, 10]]))
    assert per_image.shape == (2,) and per_image[0] == block0 + block1 + embed
    assert per_image[1] == dense_flops(dims)


def test_wrong_number_of_counts_is_refused():
    dims = TowerDims(width=8, mlp=32, depth=2, heads=2, patch_size=2, num_patches=9)
    with pytest.raises(ValueError, match="expected 3 token counts"):
        tower_flops(dims, [10, 7])


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_dims_read_from_every_backend(name):
    build, _ = ENTRIES[name]
    d = dims_of(build())
    assert (d.width, d.depth, d.heads, d.patch_size, d.num_patches, d.prefix) == (WIDTH, 4, HEADS, PATCH, NUM_PATCHES, 1)
    assert d.mlp in (2 * WIDTH, 4 * WIDTH)


def test_flops_of_last_forward_follow_stats():
    model = vwt.patch(timm_vit(), vwt.ToMe(r=3))
    with torch.no_grad():
        model(images(2))
    counts = vwt.stats(model)["tokens_per_layer"]
    got = flops_of_last_forward(model)
    assert torch.equal(got, tower_flops(dims_of(model), counts))
    assert (got < dense_flops(dims_of(model))).all()


def test_unsupported_model():
    with pytest.raises(TypeError, match="unsupported model"):
        dims_of(torch.nn.Linear(2, 2))
