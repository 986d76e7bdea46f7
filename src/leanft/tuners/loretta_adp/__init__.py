from ..common import LeanftPeftType, register
from .config import LorettaAdpConfig
from .layer import Linear, LorettaAdpLayer, TTAdapter
from .model import LorettaAdpModel

__all__ = ["Linear", "LorettaAdpConfig", "LorettaAdpLayer", "LorettaAdpModel", "TTAdapter"]

register(LeanftPeftType.LORETTA_ADP, LorettaAdpConfig, LorettaAdpModel, LorettaAdpModel.prefix)
