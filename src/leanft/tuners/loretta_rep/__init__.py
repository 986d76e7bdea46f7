from ..common import LeanftPeftType, register
from .config import LorettaRepConfig
from .layer import Linear, LorettaRepLayer
from .model import LorettaRepModel

__all__ = ["Linear", "LorettaRepConfig", "LorettaRepLayer", "LorettaRepModel"]

register(LeanftPeftType.LORETTA_REP, LorettaRepConfig, LorettaRepModel, LorettaRepModel.prefix)
