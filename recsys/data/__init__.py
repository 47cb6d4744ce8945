"""Datasets: read a source (Beauty, Amazon 2014, MovieLens, a table, or synthetic) into one form."""

from recsys.data.config import DataConfig, SyntheticConfig, TableConfig
from recsys.data.readers import load_dataset
from recsys.data.schema import DataFormatError, InteractionData
from recsys.data.synthetic import generate_synthetic

__all__ = [
    "DataConfig",
    "DataFormatError",
    "InteractionData",
    "SyntheticConfig",
    "TableConfig",
    "generate_synthetic",
    "load_dataset",
]
