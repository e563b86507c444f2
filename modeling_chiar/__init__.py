"""CHIAR-Former for transformers. Importing this package registers the config and model classes
with the Auto classes (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_chiar import ChiarConfig
from .flops import routing_report
from .modeling_chiar import (
    ChiarForCausalLM,
    ChiarForSequenceClassification,
    ChiarModel,
    ChiarPreTrainedModel,
    LayerRouting,
)

AutoConfig.register("chiar", ChiarConfig, exist_ok=True)
AutoModel.register(ChiarConfig, ChiarModel, exist_ok=True)
AutoModelForCausalLM.register(ChiarConfig, ChiarForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ChiarConfig, ChiarForSequenceClassification, exist_ok=True)

__all__ = [
    "ChiarConfig",
    "ChiarPreTrainedModel",
    "ChiarModel",
    "ChiarForCausalLM",
    "ChiarForSequenceClassification",
    "LayerRouting",
    "routing_report",
]
