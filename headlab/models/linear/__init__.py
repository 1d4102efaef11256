"""headlab's own linear-attention LMs (model_type "headlab_linear"), registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from headlab.models.linear.cache import HeadlabLinearCache
from headlab.models.linear.config import KINDS, LINEAR_KINDS, SOFTMAX_KINDS, HeadlabLinearConfig
from headlab.models.linear.mixer import LinearMixer, PatternUnavailable
from headlab.models.linear.modeling import (
    HeadlabLinearAttention,
    HeadlabLinearForCausalLM,
    HeadlabLinearModel,
)

AutoConfig.register(HeadlabLinearConfig.model_type, HeadlabLinearConfig, exist_ok=True)
AutoModel.register(HeadlabLinearConfig, HeadlabLinearModel, exist_ok=True)
AutoModelForCausalLM.register(HeadlabLinearConfig, HeadlabLinearForCausalLM, exist_ok=True)

__all__ = ["KINDS", "LINEAR_KINDS", "SOFTMAX_KINDS", "HeadlabLinearAttention", "HeadlabLinearCache",
           "HeadlabLinearConfig", "HeadlabLinearForCausalLM", "HeadlabLinearModel", "LinearMixer", "PatternUnavailable"]
