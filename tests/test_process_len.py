"""process.py and len.py end to end on samples and on tiny fixtures in the real Waterbirds and COCO layouts,
with tiny models (through the test-only ``loaded`` argument); their numbers are checked against direct
computation, and a missing data set is one line on stderr."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures
import process as process_script
import tiny
import vwt
from vwt import cli, learning, lengths
from vwt import datasets as D
from vwt.spec import Recipe, RunSpec
from vwt.tokenizer import pixel_patches
from vwt.vocab import NITER
from test_vocab import sklearn_by_hand

len_script = importlib.import_module("len")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    fixtures.write_waterbirds(r)
    fixtures.write_coco(r, fmt="karpathy")
    return r


def clip_loaded():
    return cli.Loaded(tiny.hf_clip(), "hf_clip", "tiny-hf-clip", False)


def blip_loaded():
    return cli.Loaded(tiny.hf_blip(), "hf_blip", "tiny-hf-blip", False)


def learn(argv, loaded=None):
    return process_script.main(argv + ["--workers", "0", "--device", "cpu"], loaded or clip_loaded())


def count(argv, loaded=None):
    return len_script.main(argv + ["--workers", "0", "--device", "cpu"], loaded or clip_loaded())


def test_process_on_samples_writes_the_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    vocab = learn(["--data", "samples", "--vocab", "12", "--batch", "4"])[0]
    path = tmp_path / "tokenizers" / "samples" / "v12" / "vocab.pt"
    loaded = vwt.Vocabulary.load(path)
    assert torch.equal(loaded.words, vocab.words) and loaded.words.shape == (12, 3 * tiny.PATCH ** 2)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["patch_size"] == tiny.PATCH and info["image_size"] == tiny.IMAGE and info["space"] == "pixel"
    assert info["patches_seen"] == 12 * tiny.NUM_PATCHES and info["data"] == "samples"
    assert info["kmeans"] == "paper" and info["protocol"] == "paper" and info["data_seed"] == 0
    assert info["mean"] == list(D.OPENAI_CLIP_MEAN) and "torch" in info["environment"]["versions"]
    import sklearn  # the paper's recipe draws differently under scikit-learn 1.2.2 and 1.3+: recorded twice

    assert info["sklearn"] == info["environment"]["versions"]["scikit-learn"] == sklearn.__version__
    assert info["inertia"] > 0 and info["inertia_patches"] == 12 * tiny.NUM_PATCHES
    # an existing vocabulary is kept (as the paper's --ovr False); --overwrite learns it again, the same
    def fail(*a, **k):
        raise AssertionError("learned again")

    with monkeypatch.context() as m:
        m.setattr(vwt.Vocabulary, "learn_paper", fail)
        assert torch.equal(learn(["--data", "samples", "--vocab", "12", "--batch", "4"])[0].words, vocab.words)
    assert "exists; kept" in capsys.readouterr().out
    again = learn(["--data", "samples", "--vocab", "12", "--batch", "4", "--overwrite"])[0]
    assert torch.equal(again.words, vocab.words)
    # our k-means and embed space: the paper's embed folder is the model's name below v<SIZE>/
    fast = learn(["--data", "samples", "--vocab", "12", "--kmeans", "fast", "--space", "embed", "--out", "f"])[0]
    assert fast.meta["kmeans"] == "fast" and fast.meta["niter"] == NITER and fast.meta["kmeans_on"] == "cpu"
    assert vwt.Vocabulary.load(tmp_path / "f" / "clip").dim == tiny.WIDTH
    fast_info = json.loads((tmp_path / "f" / "clip" / "vocab.json").read_text())
    assert fast_info["environment"]["versions"]["scikit-learn"] == sklearn.__version__


def test_the_papers_scikit_learn_is_an_optional_pin_outside_the_requirements():
    """extras/paper-sklearn.txt pins what the paper ran (README: learning its files bit for bit); it
    is no requirements*.txt, so CI's environment keeps the project's own."""
    lines = [ln.strip() for ln in (REPO / "extras" / "paper-sklearn.txt").read_text().splitlines()]
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    assert "scikit-learn==1.2.2" in pins and "numpy<2" in pins
    assert "extras/paper-sklearn.txt" in (REPO / "README.md").read_text()


def test_fast_kmeans_is_faiss_on_a_bottom_k_sample_of_the_images(root, tmp_path):
    """process.py --kmeans fast = the data read in the seed's random order, a bottom-k sample of
    --max-points-per-centroid patches per word (seeded), FAISS k-means on it (seeded), --niter iterations."""
    from vwt.vocab import bottom_k_sample, faiss_kmeans

    argv = ["--data", "samples", "--vocab", "5", "--kmeans", "fast", "--batch", "3", "--seeds", "2",
            "--max-points-per-centroid", "7", "--niter", "4"]
    vocab = learn(argv + ["--out", str(tmp_path / "a")])[2]
    ds = D.load("samples", root, D.transform_for("samples", "paper", image_size=tiny.IMAGE), seed=2, protocol="paper")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(2)).tolist()
    pixels = torch.stack([ds[i][0] for i in order])
    blocks = ((pixel_patches(pixels[s:s + 3], tiny.PATCH).reshape(-1, 3 * tiny.PATCH ** 2), s * tiny.NUM_PATCHES)
              for s in range(0, len(ds), 3))
    sample, _, seen = bottom_k_sample(blocks, 35, seed=2)
    words, run = faiss_kmeans(sample, 5, niter=4, seed=2)
    assert torch.equal(vocab.words, words) and vocab.meta["inertia"] == run["inertia"]
    info = json.loads((tmp_path / "a" / "seed_2" / "vocab.json").read_text())
    assert (info["kmeans"], info["niter"], info["max_points_per_centroid"], info["sample"]) == ("fast", 4, 7, 35)
    assert info["sample_stored"] == "uint8"  # kept as the images' 8-bit values, the same words as float32
    assert info["patches_seen"] == seen == len(ds) * tiny.NUM_PATCHES and info["inertia_patches"] == 35
    assert torch.equal(learn(argv + ["--out", str(tmp_path / "b")])[2].words, words)  # reproducible


def patches_of(ds, batch):
    """The pixel batches of ``ds`` in loader order, as the paper's DataLoader gives them."""
    for s in range(0, len(ds), batch):
        yield torch.stack([ds[i][0] for i in range(s, min(s + batch, len(ds)))])


@pytest.mark.parametrize("data,seed,batch,per_item", [("samples", 0, 4, 1), ("waterbirds", 2, 2, 1), ("coco", 0, 3, 5)])
def test_paper_recipe_is_sklearn_partial_fit_over_the_loader_batches(root, tmp_path, data, seed, batch, per_item):
    """process.py (paper) = scikit-learn's MiniBatchKMeans(V, batch_size, n_init="auto") after
    np.random.seed(0), one partial_fit per loader batch of the seed's train split, its own preprocessing;
    COCO with BLIP's model, one entry per caption."""
    loaded = blip_loaded() if data == "coco" else clip_loaded()
    vocab = learn(["--data", data, "--data-root", str(root), "--vocab", "7", "--batch", str(batch),
                   "--seeds", str(seed), "--out", str(tmp_path)], loaded)[seed]
    split = None if data == "samples" else "train"
    ds = D.load(data, root, D.transform_for(data, "paper", image_size=tiny.IMAGE), split=split, seed=seed,
                protocol="paper")
    if data == "coco":  # the paper's train file: each image once per caption, in a row
        ds.records = [r for r in ds.records for _ in r["captions"]]
    assert len(ds) == per_item * len(D.load(data, root, None, split=split))
    words = sklearn_by_hand(patches_of(ds, batch), 7, batch)
    assert torch.equal(vocab.words, words)
    assert vocab.meta["patches_seen"] == len(ds) * tiny.NUM_PATCHES and vocab.meta["images"] == len(ds)
    path = tmp_path / (f"seed_{seed}" if seed else "") / "vocab.pt"
    assert torch.equal(vwt.Vocabulary.load(path).words, words)


def test_paper_recipe_streams_one_batch_at_a_time(tmp_path, monkeypatch):
    """Instrumented through the whole script (loader, patches, k-means): when a batch of patches reaches
    partial_fit, no earlier batch's patches are alive."""
    import weakref

    from sklearn.cluster import MiniBatchKMeans as SK

    refs, alive, rows = [], [], []
    real = SK.partial_fit

    def watched(self, X, *a, **k):
        alive.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(X))
        rows.append(X.shape[0])
        return real(self, X, *a, **k)

    monkeypatch.setattr(SK, "partial_fit", watched)
    learn(["--data", "samples", "--vocab", "8", "--batch", "3", "--out", str(tmp_path)])
    assert rows == [3 * tiny.NUM_PATCHES] * 4 and alive == [0] * 4


def test_confounder_sets_get_one_vocabulary_per_seed_and_coco_one(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = learn(["--data", "waterbirds", "--data-root", str(root), "--vocab", "6", "--batch", "2"])
    assert sorted(out) == [1, 2, 3]
    base = tmp_path / "tokenizers" / "waterbirds" / "v6"
    assert sorted(p.relative_to(base).as_posix() for p in base.rglob("vocab.pt")) == \
        [f"seed_{s}/vocab.pt" for s in (1, 2, 3)]
    for s in (1, 2, 3):
        info = json.loads((base / f"seed_{s}" / "vocab.json").read_text())
        train = D.load("waterbirds", root, None, split="train", seed=s, protocol="paper")
        assert info["data_seed"] == s and info["patches_seen"] == len(train) * tiny.NUM_PATCHES
        assert info["kmeans_seed"] == 0  # the paper seeds k-means 0 for every split seed
    learn(["--data", "coco", "--data-root", str(root), "--vocab", "6", "--batch", "4"], blip_loaded())
    assert [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "tokenizers" / "coco").rglob("vocab.pt")] == \
        ["tokenizers/coco/v6/vocab.pt"]
    # under standard: our k-means, one vocabulary (seed 0), COCO's images once
    std = learn(["--data", "coco", "--data-root", str(root), "--vocab", "6", "--protocol", "standard", "--out", "s"],
                blip_loaded())[0]
    assert std.meta["kmeans"] == "fast" and std.meta["images"] == len(D.load("coco", root, None, split="train"))


def settled(argv):
    return learning.settle(cli.spec_from_args(process_script.parse_args(argv), learning.Options))


def test_defaults_follow_the_protocol_and_the_data():
    spec = settled(["--data", "coco"])
    assert (spec.model, spec.options.kmeans, spec.batch, spec.seeds) == (cli.DEFAULT_BLIP, "paper", 1024, (0,))
    spec = settled(["--data", "meta"])
    assert (spec.model, spec.seeds) == (cli.DEFAULT_CLIP, (1, 2, 3))
    spec = settled(["--data", "meta", "--protocol", "standard"])
    o = spec.options
    assert (o.kmeans, spec.batch, spec.seeds, o.niter, o.max_points_per_centroid) == ("fast", 32, (0,), NITER, 256)
    with pytest.raises(cli.UserError, match="--niter belongs to --kmeans fast"):
        settled(["--niter", "1"])
    with pytest.raises(cli.UserError, match="--max-points-per-centroid must be at least 1; got 0"):  # from Python;
        learning.settle(settled(["--kmeans", "fast"]).replace(max_points_per_centroid=0))  # argparse refuses it first


def test_settling_returns_a_new_spec_that_records_the_command_line(tmp_path, monkeypatch):
    """process.py's and len.py's settled defaults are new specs (the parsed one is left as it was), and
    their configurations are the command line's names, with --vocab as process.py's word count."""
    monkeypatch.chdir(tmp_path)
    args = process_script.parse_args(["--data", "samples", "--vocab", "7"])
    spec = cli.spec_from_args(args, learning.Options)
    assert spec.config() == vars(args) and spec.options.vocab == 7 and spec.method.vocab is None
    done = learning.settle(spec)
    assert (spec.batch, spec.options.kmeans, spec.model) == (None, None, None)
    assert (done.batch, done.options.kmeans, done.model) == (1024, "paper", cli.DEFAULT_CLIP)
    assert learning.settle(done) == done and list(done.config()) == list(vars(args))
    args = len_script.parse_args(["--data", "waterbirds", "--vocab", "8", "--max-images", "3"])
    spec = cli.spec_from_args(args, lengths.Options)
    assert spec.config() == vars(args) and spec.options == lengths.Options(3, None)
    done = lengths.settle(spec)
    assert spec.options.seed is None and spec.method.vocab_path is None
    assert done.options.seed == 1 and done.method.vocab_path == Path("tokenizers/waterbirds/v8/seed_1/vocab.pt")
    assert lengths.settle(done) == done


def test_fast_kmeans_without_faiss_is_one_line_before_any_work(monkeypatch):
    real = learning.importlib.util.find_spec
    monkeypatch.setattr(learning.importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    with pytest.raises(cli.UserError, match="--kmeans fast needs FAISS: pip install faiss-cpu"):
        settled(["--kmeans", "fast"])
    settled(["--kmeans", "paper"])  # the paper's recipe needs none


def test_both_experiments_run_from_python_without_a_command_line(tmp_path, monkeypatch, capsys):
    """vwt.learning.run and vwt.lengths.run take a RunSpec built in Python: the script's defaults where
    the spec leaves them to the experiment, the same words and counts as the scripts."""
    monkeypatch.chdir(tmp_path)
    spec = RunSpec(data="samples", batch=None, out=None, device="cpu", options=learning.Options(vocab=12))
    vocab = learning.run(spec, clip_loaded())[0]
    assert torch.equal(vwt.Vocabulary.load(tmp_path / "tokenizers" / "samples" / "v12").words, vocab.words)
    assert torch.equal(learn(["--data", "samples", "--vocab", "12", "--overwrite", "--out", "cli"])[0].words,
                       vocab.words)
    res = lengths.run(RunSpec(data="samples", batch=5, device="cpu", out=tmp_path / "py",
                              method=Recipe(vocab=12, vocab_data="samples")), clip_loaded())
    want = count(["--data", "samples", "--vocab", "12", "--vocab-data", "samples", "--batch", "5"])
    assert res["per_image"] == want["per_image"] and res["word_counts"] == want["word_counts"]
    assert len(list((tmp_path / "py" / "len").glob("*.json"))) == 1


def _direct_counts(loaded, ds, reducer):
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    vwt.patch(loaded.model, reducer)
    with torch.no_grad():
        loaded.model.get_image_features(pixel_values=pixels)
    counts = vwt.stats(loaded.model)["tokens_per_layer"][:, 0]
    vwt.unpatch(loaded.model)
    return pixels, counts


def test_len_on_waterbirds_counts_per_group_and_words(root, tmp_path):
    learn(["--data", "waterbirds", "--data-root", str(root), "--vocab", "8", "--batch", "2", "--seeds", "0",
           "--out", str(tmp_path / "v8")])
    out = tmp_path / "results"
    res = count(["--data", "waterbirds", "--data-root", str(root), "--vocab-path", str(tmp_path / "v8" / "vocab.pt"),
                 "--thresh", "0.3", "--batch", "3", "--out", str(out), "--protocol", "standard"])
    loaded = clip_loaded()
    ds = D.load("waterbirds", root, D.preprocess_for(loaded.model))
    inter = vwt.InterImage(vwt.Vocabulary.load(tmp_path / "v8"), thresh=0.3)
    pixels, direct = _direct_counts(loaded, ds, inter)
    assert res["per_image"] == direct.tolist()
    assert (direct < 1 + tiny.NUM_PATCHES).any()  # the threshold merges something
    groups = np.array([r["group"] for r in ds.records])
    assert list(res["groups"]) == ds.group_names
    for g, name in enumerate(ds.group_names):
        assert res["groups"][name]["mean"] == pytest.approx(direct[torch.from_numpy(groups == g)].float().mean().item())
    word, dist = inter.match(pixel_patches(pixels, tiny.PATCH))
    matched = dist <= 0.3
    assert res["word_counts"] == torch.bincount(word[matched], minlength=8).tolist()
    files = sorted(p.name for p in (out / "len").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    saved = json.loads((out / "len" / files[0]).read_text())
    assert saved["tokens"] == res["tokens"] and "torch" in saved["environment"]["versions"]
    with Image.open(out / "len" / files[1]) as im:
        assert im.size[0] > 500


def test_len_intra_on_coco_and_samples(root, tmp_path):
    for data in ("coco", "samples"):
        res = count(["--data", data, "--data-root", str(root), "--top_k", "0.5", "--out", str(tmp_path)])
        assert set(res["per_image"]) == {1 + tiny.NUM_PATCHES // 2} and "word_counts" not in res


def test_len_bucket_says_it_changes_nothing_and_changes_nothing(root, tmp_path, capsys):
    argv = ["--data", "samples", "--data-root", str(root), "--top_k", "0.5", "--batch", "4"]
    plain = count(argv + ["--out", str(tmp_path / "a")])
    assert "--bucket changes nothing" not in capsys.readouterr().out
    bucketed = count(argv + ["--bucket", "--out", str(tmp_path / "b")])
    assert "--bucket changes nothing here" in capsys.readouterr().out
    assert bucketed["per_image"] == plain["per_image"]


def test_len_refuses_a_vocabulary_that_does_not_fit(tmp_path):
    torch.save(torch.randn(5, 768), tmp_path / "vocab.pt")
    with pytest.raises(cli.UserError, match=r"\(5, 768\).*\(\d+, 16, 192\)"):
        count(["--data", "samples", "--vocab-path", str(tmp_path / "vocab.pt"), "--out", str(tmp_path)])


def test_len_needs_a_tokenizer(tmp_path):
    with pytest.raises(cli.UserError, match="choose a tokenizer"):
        count(["--data", "samples", "--out", str(tmp_path)])


@pytest.mark.parametrize("script,argv", [("process.py", ["--data", "waterbirds", "--vocab", "10"]),
                                         ("len.py", ["--data", "coco", "--top_k", "0.5"])])
def test_missing_data_set_is_one_line_naming_the_layout(tmp_path, script, argv):
    proc = subprocess.run([sys.executable, str(REPO / script)] + argv + ["--data-root", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "expected layout" in lines[0], proc.stderr


# --------------------------------------------------------------------------------------------------
# Which vocabulary a run reads: the paper's folders, in-domain by default, --imgnet, ours still accepted
# --------------------------------------------------------------------------------------------------
def method_args(argv):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--data", default="waterbirds")
    cli.add_method_args(p)
    cli.add_protocol_arg(p)
    return p.parse_args(argv)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_vocab_path_reads_the_papers_folders_in_domain_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    T = Path("tokenizers")
    for s in (1, 2, 3):
        touch(T / "waterbirds" / "v100" / f"seed_{s}" / "vocab.pt")
    touch(T / "imgnet" / "v100" / "vocab.pt")
    touch(T / "coco" / "v100" / "vocab.pt")
    args = method_args(["--vocab", "100"])
    assert [cli.vocab_path(args, s) for s in (1, 2, 3)] == [T / "waterbirds" / "v100" / f"seed_{s}" / "vocab.pt"
                                                          for s in (1, 2, 3)]
    assert cli.vocab_path(args) == T / "waterbirds" / "v100" / "seed_1" / "vocab.pt"  # no seed: the first
    imgnet = T / "imgnet" / "v100" / "vocab.pt"
    assert cli.vocab_path(method_args(["--vocab", "100", "--imgnet"]), 2) == imgnet
    assert cli.vocab_path(method_args(["--vocab", "100", "--protocol", "standard"]), 2) == imgnet
    assert cli.vocab_path(method_args(["--data", "nocaps", "--vocab", "100"]), 0) == T / "coco" / "v100" / "vocab.pt"
    assert cli.vocab_path(method_args(["--data", "openimages-rare", "--vocab", "100"])) == imgnet
    assert cli.vocab_path(method_args(["--vocab", "100", "--vocab-data", "coco"]), 3) == T / "coco" / "v100" / "vocab.pt"
    # ours: v<SIZE>-seed<N> where the paper's seed folder is missing, v<SIZE> for seed 0
    touch(T / "celeba" / "v10" / "vocab.pt")
    touch(T / "celeba" / "v10-seed2" / "vocab.pt")
    celeba = method_args(["--data", "celeba", "--vocab", "10"])
    assert [cli.vocab_path(celeba, s) for s in (0, 1, 2)] == [T / "celeba" / "v10" / "vocab.pt"] * 2 + \
        [T / "celeba" / "v10-seed2" / "vocab.pt"]
    # the paper's folder names too: tokenizers/cub/ for Waterbirds, after ours of the same kind
    touch(T / "cub" / "v10" / "seed_2" / "vocab.pt")
    touch(T / "cub" / "v10" / "seed_3" / "vocab.pt")
    touch(T / "waterbirds" / "v10" / "seed_3" / "vocab.pt")
    birds = method_args(["--vocab", "10"])
    assert [cli.vocab_path(birds, s) for s in (2, 3)] == [T / "cub" / "v10" / "seed_2" / "vocab.pt",
                                                          T / "waterbirds" / "v10" / "seed_3" / "vocab.pt"]
    assert cli.vocab_path(birds, 1) == T / "waterbirds" / "v10" / "seed_1" / "vocab.pt"  # neither: ours, for the error
    # --vocab-path wins; '{seed}' picks one per seed
    assert cli.vocab_path(method_args(["--vocab-path", "x/s{seed}/vocab.pt"]), 2) == Path("x/s2/vocab.pt")
    with pytest.raises(cli.UserError, match="--imgnet .* contradicts --vocab-data celeba"):
        cli.vocab_path(method_args(["--vocab", "10", "--imgnet", "--vocab-data", "celeba"]))


def test_missing_vocabulary_hints_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UserError) as e:
        cli.reducers_from_args(method_args(["--vocab-path", "nowhere/vocab.pt"]))
    assert str(e.value) == ("vocabulary nowhere/vocab.pt not found; check the path, or learn one with "
                            "`python process.py --data DATA --vocab SIZE --out FOLDER`")
    with pytest.raises(cli.UserError) as e:
        cli.reducers_from_args(method_args(["--data", "meta", "--vocab", "100"]), seed=2)
    assert str(e.value).startswith("vocabulary tokenizers/meta/v100/seed_2/vocab.pt not found; learn it with "
                                   "`python process.py --data meta --vocab 100`")


def test_len_reads_the_in_domain_vocabulary_process_wrote(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    learn(["--data", "waterbirds", "--data-root", str(root), "--vocab", "8", "--batch", "2", "--seeds", "2"])
    res = count(["--data", "waterbirds", "--data-root", str(root), "--vocab", "8", "--thresh", "0.3"])
    assert len(res["word_counts"]) == 8  # found tokenizers/waterbirds/v8/seed_2/vocab.pt without --vocab-data


def test_pixel_space_process_and_len_run_offline_without_a_model_cache(tmp_path):
    """The issue's two commands, offline with an empty Hugging Face cache: random weights of the
    architecture, said in one line; words and token counts do not depend on weights."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None), env.pop("TRANSFORMERS_CACHE", None)
    for argv in (["process.py", "--data", "samples", "--vocab", "100"],
                 ["len.py", "--data", "samples", "--vocab", "100", "--vocab-data", "samples"]):
        proc = subprocess.run([sys.executable, str(REPO / argv[0])] + argv[1:], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sum("using random weights" in l for l in proc.stdout.splitlines()) == 1, proc.stdout
    words = vwt.Vocabulary.load(tmp_path / "tokenizers" / "samples" / "v100")
    assert words.words.shape == (100, 768) and words.meta["pretrained"] is False
    saved = json.loads(next((tmp_path / "runs" / "len").glob("*.json")).read_text())
    assert saved["tokens"]["images"] == 12 and len(saved["word_counts"]) == 100


def test_method_name_says_whose_vocabulary():
    assert cli.method_name(method_args(["--vocab", "100"])) == "inter-v100-t0.1"  # in-domain
    assert cli.method_name(method_args(["--vocab", "100", "--imgnet"])) == "inter-v100-imgnet-t0.1"
    assert cli.method_name(method_args(["--vocab", "100", "--protocol", "standard"])) == "inter-v100-imgnet-t0.1"


def test_paper_process_reads_imagenet_at_224_px_whatever_the_models_size(tmp_path):
    """The paper's process.py reads ImageNet through its loader at 224 px, for CLIP and BLIP alike; the
    tiny model takes 32 px images: its pixel words come from 224 px images under paper, 32 px under
    standard."""
    root = fixtures.write_imagenet(tmp_path / "data")
    n = len(D.load("imgnet", root, None, split="train"))
    for protocol, px in (("paper", 224), ("standard", tiny.IMAGE)):
        vocab = learn(["--data", "imgnet", "--data-root", str(root), "--vocab", "5", "--batch", "4",
                       "--protocol", protocol, "--kmeans", "paper", "--out", str(tmp_path / protocol)])[0]
        assert vocab.meta["image_size"] == px and vocab.meta["patches_seen"] == n * (px // tiny.PATCH) ** 2
    ds = D.load("imgnet", root, D.transform_for("imgnet", "paper", image_size=224), split="train")
    assert ds[0][0].shape[-1] == 224
    paper = vwt.Vocabulary.load(tmp_path / "paper" / "vocab.pt")
    assert torch.equal(paper.words, sklearn_by_hand(patches_of(ds, 4), 5, 4))  # the loader's 224 px patches


def test_fast_kmeans_reads_one_batch_ahead_per_worker(root, tmp_path, monkeypatch):
    """The loader's workers prefetch one batch each (PyTorch's default is 2): memory holds about
    workers + 1 batches besides the sample."""
    import vwt.learning

    made = []
    real = torch.utils.data.DataLoader.__init__

    def spy(self, *a, **k):
        made.append(k)
        real(self, *a, **k)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", spy)
    process_script.main(["--data", "samples", "--vocab", "5", "--kmeans", "fast", "--batch", "3", "--workers", "1",
                         "--device", "cpu", "--out", str(tmp_path)], clip_loaded())
    assert vwt.learning.PREFETCH == 1 and made and all(k.get("prefetch_factor") == 1 for k in made)


def test_paper_recipe_in_torch_matches_sklearn_and_says_which_ran(tmp_path):
    """--engine torch: the paper recipe's words within float32 rounding of scikit-learn's, the sidecar
    naming the engine and how inertia was measured (every patch at assignment; scikit-learn: a sample)."""
    from vwt.kmeans import TOLERANCE

    argv = ["--data", "samples", "--vocab", "5", "--batch", "4", "--kmeans", "paper"]
    sk = learn(argv + ["--out", str(tmp_path / "sk")])[0]  # one CPU process: scikit-learn by default
    ours = learn(argv + ["--engine", "torch", "--out", str(tmp_path / "torch")])[0]
    assert (sk.meta["engine"], ours.meta["engine"]) == ("sklearn", "torch")
    assert (ours.words - sk.words).abs().max() <= TOLERANCE * sk.words.abs().max()
    assert "sample" in sk.meta["inertia_on"] and "every patch" in ours.meta["inertia_on"]
    assert ours.meta["inertia_patches"] == ours.meta["patches_seen"] == sk.meta["patches_seen"]
