"""leanft's PEFT tuners, one subpackage per method; importing registers them with PEFT."""

from .loretta_adp import LorettaAdpConfig, LorettaAdpModel
from .loretta_rep import LorettaRepConfig, LorettaRepModel

__all__ = ["LorettaAdpConfig", "LorettaAdpModel", "LorettaRepConfig", "LorettaRepModel"]
