"""Sequence models behind one contract, and the registry that names them."""

from recsys.models.base import AtomicIdModel, Batch, Recommendation, SequenceModel
from recsys.models.registry import build_model, get_spec, model_config_from_dict, model_names, register_model
from recsys.models.sasrec import SASRec, SASRecConfig

register_model("sasrec", SASRecConfig, SASRec)

__all__ = [
    "AtomicIdModel", "Batch", "Recommendation", "SequenceModel", "SASRec", "SASRecConfig",
    "build_model", "get_spec", "model_config_from_dict", "model_names", "register_model",
]
