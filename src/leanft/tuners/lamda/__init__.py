from ..common import LeanftPeftType, register
from .config import LamdaConfig
from .layer import LamdaLayer, Linear
from .model import LamdaModel
from .schedule import lamda_ranks

__all__ = ["LamdaConfig", "LamdaLayer", "LamdaModel", "Linear", "lamda_ranks"]

register(LeanftPeftType.LAMDA, LamdaConfig, LamdaModel, LamdaModel.prefix)
