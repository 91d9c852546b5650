"""A semantic check on real data: a small ViT trained here on scikit-learn's digits (8x8 images upsampled
to 24x24, 4x4 patches: 36 patch tokens + class token) keeps its test accuracy under each in-network reducer at a
moderate setting, and under int8. Run with ``pytest -s`` to see the accuracies."""
import pytest
import torch

import vwt

pytestmark = pytest.mark.slow  # about 15-20 s of training on the shared 2-core CPU

TOLERANCE = 0.05  # accuracy points a moderate setting may lose


@pytest.fixture(scope="module")
def trained():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from timm.models.vision_transformer import VisionTransformer

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=24, mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target)
    tr, te = train_test_split(torch.arange(len(y)), test_size=0.25, random_state=0, stratify=y)

    torch.manual_seed(0)
    model = VisionTransformer(img_size=24, patch_size=4, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2,
                              num_classes=10, global_pool="token")
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    epochs, batch = 25, 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=epochs * ((len(tr) + batch - 1) // batch))
    model.train()
    for _ in range(epochs):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), x[te], y[te]


def accuracy(model, x, y):
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


def test_reducers_keep_accuracy_on_digits(trained):
    model, x, y = trained
    base = accuracy(model, x, y)
    assert base > 0.9, f"the small ViT did not learn digits ({base:.3f})"
    results = {}
    methods = {"tome r=4": [vwt.ToMe(r=4)],
               "evit keep=0.7 (blocks 1, 2)": [vwt.EViT(keep=0.7)],
               "lgtm r=4 dense=1 local=1": [vwt.LGTM(r=4, dense=1, local=1)],
               "intra drop=0.25 + tome r=2": [vwt.IntraImage(0.25), vwt.ToMe(r=2)]}
    for name, reducers in methods.items():
        vwt.patch(model, *reducers)
        results[name] = (accuracy(model, x, y), vwt.stats(model)["tokens_per_layer"][0].tolist())
    vwt.unpatch(model)
    print(f"\ndigits test accuracy: base {base:.3f} (37 tokens)")
    for name, (acc, counts) in results.items():
        print(f"  {name:28s} {acc:.3f}  tokens per layer {counts}")
    for name, (acc, counts) in results.items():
        assert counts[-1] < 37
        assert acc >= base - TOLERANCE, f"{name}: {acc:.3f} vs base {base:.3f}"


def test_int8_keeps_accuracy_on_digits(trained):
    import copy

    model, x, y = trained
    base = accuracy(model, x, y)
    q = vwt.quantize(copy.deepcopy(model), backend="torchao")
    int8 = accuracy(vwt.patch(q), x, y)
    int8_tome = accuracy(vwt.patch(q, vwt.ToMe(r=4)), x, y)
    print(f"\ndigits int8: base {base:.3f}, int8 {int8:.3f}, int8 + tome r=4 {int8_tome:.3f}")
    assert int8 >= base - 0.02
    assert int8_tome >= base - TOLERANCE
