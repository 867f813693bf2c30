"""Long Range Arena data (Tay et al. 2020), registered as datasets of the trainer.

    lra_listops      ListOps: generated (polyattn data listops) or the release's TSV files
    lra_text         byte-level IMDB from the aclImdb folders
    lra_retrieval    byte-level AAN document pairs from the release's TSV files
    lra_image        CIFAR-10 grayscale, 1,024 pixel tokens, from the python-pickle release
    lra_pathfinder   Pathfinder: generated (polyattn data pathfinder) or the release's PNG + metadata

Items are ({"tokens", "padding_mask"}, label), or for Retrieval
({"tokens1", "padding_mask1", "tokens2", "padding_mask2"}, label).
"""

from . import image, listops, pathfinder, retrieval, text  # noqa: F401  (registers the datasets)
from .common import cache_root
from .image import grayscale_tokens, load_cifar_gray
from .listops import evaluate_listops, generate_listops, load_listops, read_listops_tsv, write_listops
from .pathfinder import PathfinderSpec, load_pathfinder, make_pathfinder_image, read_pathfinder, write_pathfinder
from .retrieval import load_aan, read_aan_tsv
from .text import load_imdb

__all__ = [
    "PathfinderSpec",
    "cache_root",
    "evaluate_listops",
    "generate_listops",
    "grayscale_tokens",
    "load_aan",
    "load_cifar_gray",
    "load_imdb",
    "load_listops",
    "load_pathfinder",
    "make_pathfinder_image",
    "read_aan_tsv",
    "read_listops_tsv",
    "read_pathfinder",
    "write_listops",
    "write_pathfinder",
]
