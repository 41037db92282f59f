"""Data: one :class:`Dataset` type, loaders, the synthetic default, NSD preparation."""

from brainrecon.data.dataset import Dataset, Split, SplitArrays, from_arrays
from brainrecon.data.loaders import (
    ENV_VAR,
    dataset_from_spec,
    load_arrays_file,
    load_brain_diffuser,
    load_brainrecon,
    load_dataset,
)

__all__ = [
    "ENV_VAR",
    "Dataset",
    "Split",
    "SplitArrays",
    "dataset_from_spec",
    "from_arrays",
    "load_arrays_file",
    "load_brain_diffuser",
    "load_brainrecon",
    "load_dataset",
]
