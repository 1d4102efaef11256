"""Model adapters: bundled names, HF folders and objects, TransformerBridge and nnsight inputs."""

from headlab.models.arch import ARCHS, ArchSpec, register_arch
from headlab.models.bundled import BUNDLED
from headlab.models.head_model import HeadModel
from headlab.models.loading import load
from headlab.models import linear  # registers model_type "headlab_linear" with the Auto classes
from headlab.models import linearized  # registers model_type "headlab_linearized"
from headlab.models import fla_adapter  # noqa: F401  registers fla's "gla" / "delta_net" when fla is installed

__all__ = ["ARCHS", "ArchSpec", "BUNDLED", "HeadModel", "load", "register_arch"]
