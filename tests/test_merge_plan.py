"""The shared merge-plan apply (vwt.merge._apply): a plan that folds nothing leaves every token, size
and label as it is, for every reducer that makes plans (EViT without fusion, ToMe and LGTM with a
budget of 0, in a whole batch or in one image of a padded batch).

EViT without fusion once lost a kept token here: its plan had no fused slot, the fold target was
clamped onto the last kept slot, and the apply wrote the (empty) weighted fold over it: a zero vector
still counted as a token."""
import math

import torch

import vwt
from vwt.encoder import BlockContext, initial_state
from vwt.merge import _apply, _bipartite_match, _Plan, _windows


def state_of(x, size=None, grid=None):
    b, n, _ = x.shape
    s = initial_state(x, grid or (1, n - 1), prefix=1)
    s.size = size
    return s


def cls_context(logit):
    """A BlockContext whose class-token attention is softmax(logit) (B, N), one head."""
    b, n = logit.shape
    q = torch.zeros(b, 1, n, 2)
    q[..., 0] = 1.0
    k = torch.zeros(b, 1, n, 2)
    k[:, 0, :, 0] = logit
    return BlockContext(0, 1, q=q, k=k, scale=1.0, bias=None)


def test_a_weighted_fold_with_nothing_to_fold_keeps_its_slot():
    # image 0 folds tokens 3 and 4 into slot 5; image 1's folds are all filler: its slot 5 (a kept token)
    # must not become the empty sum
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    ident = torch.arange(6).expand(2, -1)
    weight = torch.rand(2, 2)
    plan = _Plan(take=ident, real=torch.ones(2, 6, dtype=torch.bool), src=torch.tensor([[3, 4], [3, 4]]),
                 dst=torch.full((2, 2), 5), valid=torch.tensor([[True, True], [False, False]]),
                 new_index=ident, weight=weight)
    out = _apply(state_of(x), plan)
    assert torch.allclose(out.x[0, 5], weight[0] @ x[0, 3:5], atol=1e-6)
    assert torch.equal(out.x[0, :5], x[0, :5])
    assert torch.equal(out.x[1], x[1])
    assert out.size[1].tolist() == [1.0] * 6


def test_a_plan_without_fold_target_folds_nothing():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    ident = torch.arange(6).expand(2, -1)
    none = torch.zeros(2, 0, dtype=torch.long)
    for weight in (None, torch.zeros(2, 0)):
        plan = _Plan(take=ident, real=torch.ones(2, 6, dtype=torch.bool), src=none, dst=none,
                     valid=none.bool(), new_index=ident, weight=weight)
        out = _apply(state_of(x), plan)
        assert torch.equal(out.x, x) and out.size.tolist() == [[1.0] * 6] * 2


def test_evit_without_fusion_keeps_exactly_its_top_tokens():
    # image 1 is padded: 7 real non-prefix tokens keep ceil(0.6 * 7) = 5, image 0 keeps ceil(0.6 * 10) = 6
    torch.manual_seed(0)
    b, n, c, keep = 2, 11, 5, 0.6
    x = torch.randn(b, n, c)
    size = torch.ones(b, n)
    size[1, 8:] = 0
    logit = torch.randn(b, n)
    logit[1, 8:] = -math.inf                                             # as the pad mask makes it
    out = vwt.EViT(keep=keep, layers=(0,), fuse=False).after_attn(state_of(x, size), cls_context(logit))
    assert out.num_tokens == 1 + 6
    for i, real in enumerate((10, 7)):
        kept = math.ceil(keep * real)
        top = logit[i, 1:1 + real].argsort(descending=True)[:kept]
        assert torch.equal(out.x[i, :1 + kept], torch.cat([x[i, :1], x[i, 1 + top]]))
        assert out.size[i].tolist() == [1.0] * (1 + kept) + [0.0] * (6 - kept)
        assert (out.labels[i] >= 0).sum().item() == kept               # dropped patches: -1
        assert sorted(out.labels[i][out.labels[i] >= 0].tolist()) == list(range(1, 1 + kept))


def test_tome_and_lgtm_plans_with_a_budget_of_zero_fold_nothing():
    torch.manual_seed(0)
    x, metric = torch.randn(3, 9, 6), torch.randn(3, 9, 4)
    state = state_of(x, grid=(2, 4))
    groups = _windows(state)
    for budget, grouped in ((torch.zeros(3, 1, dtype=torch.long), None), (torch.zeros(3, 4, dtype=torch.long), groups)):
        out = _apply(state, _bipartite_match(state, metric, budget, max_merges=4, groups=grouped))
        assert torch.equal(out.x, x) and out.size.tolist() == [[1.0] * 9] * 3
        assert torch.equal(out.labels, state.labels)


def test_an_image_capped_to_no_merge_is_untouched_beside_one_that_merges():
    # image 1 has the class token and one real token, then pads: ToMe's and LGTM's caps give it 0 merges
    # while image 0 merges; its real tokens, sizes and labels must come through as they were
    torch.manual_seed(0)
    x = torch.randn(2, 9, 6)
    size = torch.ones(2, 9)
    size[1, 2:] = 0
    k = torch.randn(2, 1, 9, 4)
    ctx = BlockContext(0, 4, q=k, k=k, scale=1.0, bias=None)
    for reducer in (vwt.ToMe(r=3), vwt.LGTM(r=8, dense=0, local=1)):
        state = state_of(x, size, grid=(2, 4))
        state.labels = torch.tensor([list(range(1, 9)), [1] * 8])
        out = reducer.after_attn(state, ctx)
        assert out.num_tokens < 9 and out.size[0].sum().item() == 9     # image 0 merged
        assert torch.equal(out.x[1, :2], x[1, :2]) and out.size[1, :2].tolist() == [1.0, 1.0]
        assert (out.size[1, 2:] == 0).all() and out.labels[1].tolist() == [1] * 8
