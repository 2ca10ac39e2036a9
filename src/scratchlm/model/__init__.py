"""The decoder-only Transformer: config and presets, layers, KV cache, and sizing arithmetic.

`from scratchlm.model import Transformer, model_config` is the usual entry point. Not for
training, LoRA, quantization or conversions (they live in their own stages and adapt this).
"""

from scratchlm.model.config import PRESETS, ModelConfig, model_config
from scratchlm.model.kv_cache import KVCache
from scratchlm.model.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "model_config", "KVCache", "Transformer"]
