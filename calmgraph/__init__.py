"""calmgraph: compose language models CALM-style, compiled into one torch.fx GraphModule."""
from .checkpoint import load_new
from .composed import ComposedModel
from .compiler import TapPoint, compile, tap_points
from .cross_attention import CrossAttention
from .errors import (CalmGraphError, CheckpointError, ConfigError, ExportError, InputError, LayerRefError, ModelError, SpecError,
                     TraceError, WriteError)
from .load import load
from .sources import load_models
from .train import FineTuner, TrainConfig, next_token_loss
from .spec import (AnchorSpec, AugmentSpec, CompositionSpec, CrossAttentionSpec, EdgeSpec, Every,
                   load_spec)

__all__ = [
    "AnchorSpec", "AugmentSpec", "CalmGraphError", "CheckpointError", "ComposedModel", "CompositionSpec",
    "CrossAttention", "CrossAttentionSpec", "EdgeSpec", "Every", "ExportError", "FineTuner", "InputError",
    "LayerRefError", "ModelError", "SpecError", "TapPoint", "TraceError", "TrainConfig", "compile", "load_models",
    "load", "load_new", "load_spec", "next_token_loss", "tap_points", "WriteError", "ConfigError",
]
__version__ = "0.1.0"
