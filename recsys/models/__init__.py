"""Sequence models behind one contract, and the registry that names them."""

from recsys.models.base import (AtomicIdModel, Batch, Capabilities, GenerativeRetriever, LossOutput, Ranker,
                                Recommendation, Retriever, SequenceModel)
from recsys.models.eager import Eager, EagerConfig
from recsys.models.hstu import HSTU, HSTUConfig
from recsys.models.registry import (build_model, get_spec, model_config_from_dict, model_names, register_model,
                                    with_inference_settings)
from recsys.models.sasrec import SASRec, SASRecConfig
from recsys.models.tiger import Tiger, TigerConfig
from recsys.models.twin import Twin, TwinConfig, TwinV2Config
from recsys.models.two_tower import TwoTower, TwoTowerConfig
from recsys.models.vocabulary import IdTable, SemanticVocabulary, semantic_id_table

register_model("sasrec", SASRecConfig, SASRec)
register_model("hstu", HSTUConfig, HSTU)
register_model("tiger", TigerConfig, Tiger)
register_model("two_tower", TwoTowerConfig, TwoTower)
register_model("eager", EagerConfig, Eager)
register_model("twin", TwinConfig, Twin)  # model.history=behaviours: TWIN
register_model("twin_v2", TwinV2Config, Twin)  # model.history=clusters: TWIN-V2

__all__ = [
    "AtomicIdModel", "Batch", "Capabilities", "LossOutput", "Ranker", "Recommendation", "Retriever",
    "SequenceModel", "SASRec", "SASRecConfig", "HSTU", "HSTUConfig", "Tiger", "TigerConfig",
    "Eager", "EagerConfig", "Twin", "TwinConfig", "TwinV2Config", "semantic_id_table", "IdTable",
    "SemanticVocabulary", "GenerativeRetriever",
    "build_model", "get_spec", "model_config_from_dict", "model_names", "register_model", "with_inference_settings",
]
