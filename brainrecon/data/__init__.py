"""Data: one :class:`Dataset` type (averages, single trials, a validation split), loaders (prepared NSD,
Brain-Diffuser, MindEye1 and MindEye2 distributions, arrays), the synthetic default, NSD preparation."""

from brainrecon.data.dataset import Dataset, Split, SplitArrays, Trials, from_arrays
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
    "Trials",
    "dataset_from_spec",
    "from_arrays",
    "load_arrays_file",
    "load_brain_diffuser",
    "load_brainrecon",
    "load_dataset",
]
