"""Where vocabularies live on disk: process.py's folders (the paper's ``v<SIZE>/seed_<N>/`` and ours),
which file a run's flags name, loading one with one-line errors, and the samples vocabulary learned on
first use."""
from __future__ import annotations

import functools
import itertools
import string
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import datasets
from .errors import UserError, first_line
from .flops import dims_of
from .spec import RunSpec
from .results import writable_dir
from .vocab import Vocabulary


def tokenizer_dir(data: str, size: int) -> Path:
    """Where process.py puts the vocabularies of ``size`` words learned on ``data``, as the paper's code:
    ``vocab.pt`` here for data sets learned once (COCO, ImageNet), ``seed_<N>/vocab.pt`` below it for
    those learned once per seed (Waterbirds, CelebA, MetaShift)."""
    return Path("tokenizers") / data / f"v{size}"


def __getattr__(attr: str):  # the table's lists, read when asked (rows may be registered later)
    if attr == "IN_DOMAIN":  # a data set's in-domain vocabulary where it is not its own (NoCaps: COCO's)
        return {r.name: r.vocab for r in datasets.DATASETS.values() if r.vocab}
    if attr == "PROCESS_DATA":  # what process.py learns on
        return datasets.names(learnable=True)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def vocab_data(spec: RunSpec) -> str:
    """The data set whose --vocab vocabulary a run reads: --imgnet, --vocab-data, or by default the
    in-domain one where the protocol says so (the paper's scripts) and ImageNet's otherwise."""
    chosen = spec.method.vocab_data
    if spec.method.imgnet:
        if chosen not in (None, "imgnet"):
            raise UserError(f"--imgnet reads the ImageNet vocabulary; it contradicts --vocab-data {chosen}: drop one")
        return "imgnet"
    if chosen:
        return chosen
    if not spec.protocol.in_domain_vocab:
        return "imgnet"
    data = spec.data or "imgnet"
    return datasets.DATASETS[data].in_domain if data in datasets.DATASETS else data


def vocab_candidates(data: str, size: int, seed: Optional[int] = None) -> list:
    """The vocab.pt files that may hold ``data``'s ``size``-word vocabulary for ``seed``, best first:
    the paper's ``v<SIZE>/seed_<N>/`` and ours ``v<SIZE>-seed<N>/`` for a seed other than 0, then the
    seed-less ``v<SIZE>/`` (data sets learned once), then for no seed the lowest ``v<SIZE>/seed_<N>/``;
    each in ``tokenizers/<data>/`` and then in the paper's folder for the data set where it names it
    otherwise (``tokenizers/cub/`` for Waterbirds)."""
    row = datasets.DATASETS.get(data)
    names = [data] + ([row.paper_name] if row is not None and row.paper_name else [])
    per_name = [_candidates_in(tokenizer_dir(name, size), seed) for name in names]
    return [c for kind in itertools.zip_longest(*per_name) for c in kind if c is not None]


def _candidates_in(base: Path, seed: Optional[int]) -> list:
    """:func:`vocab_candidates` in one folder ``tokenizers/<name>/v<SIZE>``."""
    found = []
    if seed:
        found += [base / f"seed_{seed}" / "vocab.pt", base.with_name(f"{base.name}-seed{seed}") / "vocab.pt"]
    found += [base / "vocab.pt", base / "seed_0" / "vocab.pt"]
    if seed is None and base.is_dir():
        seeds = sorted(int(d.name[5:]) for d in base.glob("seed_*") if d.name[5:].isdigit())
        found += [base / f"seed_{s}" / "vocab.pt" for s in seeds]
    return found


def check_vocab_path(path) -> None:
    """A --vocab-path's only format field may be ``{seed}`` (a literal brace is doubled, ``{{``); anything
    else (``{0}``, ``{data}``, an unclosed ``{``) is a ValueError saying so."""
    text = str(path)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ValueError(f"{text!r} is not a path template ({e}); its only field may be {{seed}} (write a "
                         "literal brace as {{ or }})") from None
    other = [f"{{{f}}}" for f in fields if f != "seed"]
    if other:
        raise ValueError(f"{text!r} has the field {other[0]}; its only field may be {{seed}} (the run's seed; "
                         "a literal brace is written {{ or }})")


def vocab_path(spec: RunSpec, seed: Optional[int] = None) -> Optional[Path]:
    """The vocabulary file a run uses for ``seed`` (None: the data set's one, or its first seed's):
    --vocab-path ('{seed}' in it replaced by the seed, 0 for none; no other field, see
    :func:`check_vocab_path`; ``hf:OWNER/NAME`` the hub cache's file, :func:`hub_vocabulary`), or for
    --vocab SIZE the first existing of :func:`vocab_candidates` (the first candidate when none exists,
    for the error)."""
    if spec.method.vocab_path is not None:
        path = str(spec.method.vocab_path)
        if path.startswith(HUB):
            return hub_vocabulary(path)
        try:
            check_vocab_path(path)
        except ValueError as e:
            raise UserError(f"--vocab-path {e}") from None
        return Path(path.format(seed=seed or 0) if "{" in path or "}" in path else path)
    if spec.method.vocab is None:
        return None
    candidates = vocab_candidates(vocab_data(spec), spec.method.vocab, seed)
    return next((c for c in candidates if c.exists()), candidates[0])


HUB = "hf:"  # --vocab-path hf:OWNER/NAME: the vocab.pt of a model repository on the Hugging Face hub
PUBLISHED = tuple(f"LeonidasY/inter-image-imgnet-{v}" for v in (100, 1000, 10000))  # the paper's, ImageNet-1K


@functools.lru_cache(maxsize=None)
def hub_vocabulary(name: str) -> Path:
    """The local file of ``hf:OWNER/NAME``, the ``vocab.pt`` of that Hugging Face model repository (the
    paper's are :data:`PUBLISHED`): downloaded by huggingface_hub into its cache on first use (asking
    once, after :func:`vwt.models.hub_reachable`), read from the cache offline; a one-line UserError
    that says how to get it where it cannot be had. Once per process."""
    repo = name[len(HUB):].strip("/")
    if "{seed}" in repo or repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"--vocab-path {name}: a published vocabulary is named hf:OWNER/NAME, one per repository "
                        f"('{{seed}}' does not apply), e.g. hf:{PUBLISHED[1]}")
    from huggingface_hub import constants, hf_hub_download

    from .models import hub_reachable

    hub_reachable()
    try:
        return Path(hf_hub_download(repo, "vocab.pt"))
    except Exception as e:  # offline and not cached, no such repository or file, a network fault
        kinds = {c.__name__ for c in type(e).__mro__}
        get = f"hf download {repo} vocab.pt"
        if "LocalEntryNotFoundError" in kinds or "OfflineModeIsEnabled" in kinds:
            why = (f"is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline; run once "
                   f"online, or: {get}")
        elif "RepositoryNotFoundError" in kinds:
            why = f"is not a repository on the Hugging Face hub (the paper's: {', '.join(PUBLISHED)})"
        elif "EntryNotFoundError" in kinds:
            why = "has no vocab.pt on the Hugging Face hub"
        else:
            why = f"cannot be downloaded ({first_line(e)}); try: {get}"
        raise UserError(f"--vocab-path {name} {why}") from None


def vocab_label(path) -> str:
    """The short name of a --vocab-path vocabulary in method labels: its folder's name, the repository's
    name for ``hf:OWNER/NAME``."""
    text = str(path)
    return text.rstrip("/").rsplit("/", 1)[-1] if text.startswith(HUB) else Path(text).parent.name


def read_vocabulary(path: Path, missing_hint: str = ""):
    """Load a vocabulary; a missing or unreadable file is a one-line UserError."""
    if not Path(path).exists():
        raise UserError(f"vocabulary {path} not found{missing_hint}")
    try:
        return Vocabulary.load(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"cannot read vocabulary {path}: {e}") from None



def missing_vocab_hint(spec: RunSpec) -> str:
    """What to do when the vocabulary the flags name does not exist (appended to 'not found')."""
    if spec.method.vocab_path is not None:
        return "; check the path, or learn one with `python process.py --data DATA --vocab SIZE --out FOLDER`"
    data = vocab_data(spec)
    if data not in datasets.names(learnable=True):
        return f"; process.py does not learn on {data}: pass --vocab-data, --imgnet or --vocab-path"
    return (f"; learn it with `python process.py --data {data} --vocab {spec.method.vocab}`, or pass --vocab-data, "
            "--imgnet or --vocab-path")



def samples_vocabulary(size: int, vision: nn.Module, preprocess, images: Optional[torch.Tensor] = None,
                       stream=None):
    """A pixel-space vocabulary of ``size`` words learned on the ``samples`` photographs with the model's
    patch size and preprocessing, cached in tokenizers/samples/v<size>/ (v<size>-p<P>-<S>px for models
    other than patch 16 at 224 px): learned on first use, relearned when the cache does not fit the
    model. ``images``: the preprocessed samples where the caller has them. ``stream``: where the one
    "learning ..." line goes (default stderr). A vocabulary learned here has ``meta["learned_in_s"]``.
    Returns (vocab, path)."""
    patch, px = dims_of(vision).patch_size, preprocess.size
    cache = tokenizer_dir("samples", size)
    path = (cache if (patch, px) == (16, 224) else cache.with_name(f"v{size}-p{patch}-{px}px")) / "vocab.pt"
    if path.exists():
        vocab = read_vocabulary(path)
        if (vocab.space, vocab.patch_size, tuple(vocab.meta.get("mean", ())), tuple(vocab.meta.get("std", ()))) == \
                ("pixel", patch, tuple(preprocess.mean), tuple(preprocess.std)):
            return vocab, path
    if images is None:
        ds = datasets.Samples(preprocess)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
    n = images.shape[0] * (images.shape[-1] // patch) * (images.shape[-2] // patch)
    if n < size:
        raise UserError(f"cannot learn {size} visual words from the {n} patches of the samples; use a smaller "
                        "--vocab or pass --vocab-path")
    writable_dir(path.parent, "the vocabulary folder")
    started = time.perf_counter()
    print(f"learning a {size}-word vocabulary on the {images.shape[0]} sample images -> {path}",
          file=sys.stderr if stream is None else stream, flush=True)
    vocab = Vocabulary.learn([images[i:i + 64] for i in range(0, len(images), 64)], size=size, space="pixel",
                             patch_size=patch, data="samples", image_size=px, mean=list(preprocess.mean),
                             std=list(preprocess.std))
    path = vocab.save(path.parent)  # where it went (a full disk: the temporary-files folder)
    vocab.meta["learned_in_s"] = time.perf_counter() - started
    return vocab, path
