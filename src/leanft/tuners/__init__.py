"""leanft's PEFT tuners, one subpackage per method; importing registers them with PEFT."""

from .lamda import LamdaConfig, LamdaModel
from .loretta_adp import LorettaAdpConfig, LorettaAdpModel
from .loretta_rep import LorettaRepConfig, LorettaRepModel

__all__ = ["LamdaConfig", "LamdaModel", "LorettaAdpConfig", "LorettaAdpModel", "LorettaRepConfig", "LorettaRepModel"]
