"""ling: Ling 2.5 (BailingMoeV2_5) in JAX / Flax NNX."""
from ling.cache import DecodeCache, init_cache
from ling.checkpoint import from_pretrained, save_pretrained
from ling.config import LingConfig, RopeScaling
from ling.generate import generate
from ling.model import LingModel, ModelOutput
from ling.stack import Remat

__all__ = ["DecodeCache", "LingConfig", "LingModel", "ModelOutput", "Remat", "RopeScaling", "from_pretrained",
           "generate", "init_cache", "save_pretrained"]
