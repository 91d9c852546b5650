"""The two protocols, as objects: ``PAPER`` reproduces what the VWT paper's code (wearepal/visual-word-
tokenizer, branch ``tmlr2025``) did, ``STANDARD`` is this project's choice where it serves a user better.

One attribute per row of the README's protocol table (``ROWS`` maps each row's title to its attribute,
and ``tests/test_protocol.py`` checks that the table and these objects agree). Every other module reads
a protocol through these attributes; none compares a protocol's name. A leaf module: no vwt imports.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union


@dataclass(frozen=True)
class Protocol:
    """What a run does differently under one protocol (see the README's "Protocols" table)."""

    name: str
    # seeds and splits (Waterbirds, CelebA, MetaShift): each seed re-splits the data (and reads its own
    # vocabulary); the default seeds of those data sets and of the others
    resplit: bool
    grouped_seeds: tuple
    other_seeds: tuple
    metashift_generated: bool      # MetaShift: the paper's generated 25% test split, or the release's folders
    class_names: str               # which class-name table the confounder data sets use ("paper"/"standard")
    data_preprocessing: bool       # the data set's own transform (the paper's loaders), or the model's own
    coco_train_per_caption: bool   # COCO train records: BLIP's train file, one per caption; or images once
    coco_blip_references: bool     # COCO references: BLIP's coco_karpathy_<split>_gt.json when present
    len_seed: Optional[int]        # len.py: the re-split seed by default (None: the fixed split)
    paper_tome: bool               # --tome on Hugging Face CLIP/BLIP: the paper's ToMe (else official ToMe)
    paper_tome_elsewhere: bool     # --tome on open_clip and timm (the paper never ran them: official ToMe)
    whole_model_int8: bool         # --quant on Hugging Face CLIP/BLIP: the whole model (else the vision tower)
    int8_float16_scores: bool      # clip.py --quant: scores computed in the int8 model's float16 (else float32)
    caption_prompt: str            # BLIP's text prompt
    caption_lengths: tuple         # (beams, min length, max length, max length with a length penalty > 1)
    caption_cleanup: Optional[bool]  # decode's clean_up_tokenization_spaces (None: the tokenizer's own default)
    paper_measurement: bool        # eff.py also runs the paper's own measurement on the paper's data
    kmeans: str                    # process.py's default --kmeans ("paper": scikit-learn's recipe; "fast")
    vocab_per_seed: bool           # process.py: one vocabulary per seed on the re-split data sets
    process_data_preprocessing: bool  # process.py: the data set's own transform, or the model's own
    process_coco_per_caption: bool    # process.py --data coco: one entry per caption, or each image once
    process_paper_size: bool       # process.py --data imgnet: the paper's 224 px whatever the model's size
    in_domain_vocab: bool          # --vocab SIZE reads the evaluated data set's vocabulary (else ImageNet's)
    paper_map: bool                # OpenImages mAP: the paper's get_mAP (ties one by one, no positive = AP 0)
    float32_word_ties: bool        # InterImage, 4096+ words: near ties resolved on float32 cosines (else float64)

    def __str__(self) -> str:
        return self.name

    def seeds_for(self, resplit_data: bool) -> list[int]:
        """The default seeds of a run on a data set that seeds re-split (``resplit_data``) or not."""
        return list(self.grouped_seeds if resplit_data else self.other_seeds)

    def resplits(self, resplit_data: bool) -> bool:
        """Whether each seed re-splits a data set that can be re-split (``resplit_data``)."""
        return self.resplit and resplit_data


PAPER = Protocol(
    name="paper", resplit=True, grouped_seeds=(1, 2, 3), other_seeds=(0,), metashift_generated=True,
    class_names="paper", data_preprocessing=True, coco_train_per_caption=True, coco_blip_references=True,
    len_seed=1, paper_tome=True, paper_tome_elsewhere=False, whole_model_int8=True, caption_prompt="",
    caption_lengths=(3, 5, 20, 40), caption_cleanup=True, paper_measurement=True, kmeans="paper", vocab_per_seed=True,
    process_data_preprocessing=True, process_coco_per_caption=True, in_domain_vocab=True,
    paper_map=True, float32_word_ties=True, process_paper_size=True,
    int8_float16_scores=True)

STANDARD = Protocol(
    name="standard", resplit=False, grouped_seeds=(0, 1, 2), other_seeds=(0, 1, 2), metashift_generated=False,
    class_names="standard", data_preprocessing=False, coco_train_per_caption=False, coco_blip_references=False,
    len_seed=None, paper_tome=False, paper_tome_elsewhere=False, whole_model_int8=False,
    caption_prompt="a picture of ", caption_lengths=(3, 5, 20, 40), caption_cleanup=None, paper_measurement=False, kmeans="fast",
    vocab_per_seed=False, process_data_preprocessing=False, process_coco_per_caption=False, in_domain_vocab=False,
    paper_map=False, float32_word_ties=False, process_paper_size=False,
    int8_float16_scores=False)

PROTOCOLS = {p.name: p for p in (PAPER, STANDARD)}
DEFAULT = PAPER


def get(protocol: Union[str, Protocol, None]) -> Protocol:
    """The Protocol object of a name (``paper``, ``standard``), or the object itself; None: the default."""
    if protocol is None:
        return DEFAULT
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except (KeyError, TypeError):
        from .errors import UserError

        raise UserError(f"unknown protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}") from None


# The README's protocol table: each row's title -> the attribute(s) it documents.
ROWS = {
    "seeds and splits (Waterbirds, CelebA, MetaShift)": ("resplit", "grouped_seeds", "other_seeds"),
    "MetaShift split": ("metashift_generated",),
    "class names": ("class_names",),
    "preprocessing": ("data_preprocessing",),
    "COCO train records (`process.py --data coco`)": ("coco_train_per_caption",),
    "COCO references": ("coco_blip_references",),
    "`len.py`": ("len_seed",),
    "ToMe (`--tome R`) on Hugging Face CLIP and BLIP": ("paper_tome",),
    "ToMe on open_clip and timm": ("paper_tome_elsewhere",),
    "int8 (`--quant`)": ("whole_model_int8",),
    "zero-shot scores with `--quant`": ("int8_float16_scores",),
    "BLIP captions: text prompt": ("caption_prompt",),
    "BLIP captions: lengths": ("caption_lengths",),
    "BLIP captions: decoding": ("caption_cleanup",),
    "`eff.py` measurement": ("paper_measurement",),
    "k-means in `process.py` (`--kmeans`)": ("kmeans",),
    "vocabularies per seed in `process.py`": ("vocab_per_seed",),
    "preprocessing in `process.py`": ("process_data_preprocessing",),
    "COCO's train data in `process.py`": ("process_coco_per_caption",),
    "image size in `process.py --data imgnet`": ("process_paper_size",),
    "default `--vocab` vocabulary of clip.py, blip.py, len.py, eff.py": ("in_domain_vocab",),
    "OpenImages mAP": ("paper_map",),
    "nearest word in vocabularies of 4096 words or more (VWT inter-image)": ("float32_word_ties",),
}


def attributes() -> list[str]:
    """Every attribute that differs by protocol (all but ``name``)."""
    return [f.name for f in fields(Protocol) if f.name != "name"]
