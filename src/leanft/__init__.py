"""leanft: ultra-low-parameter and memory-efficient fine-tuning of LLMs, as PEFT tuners.

Importing leanft registers its methods with PEFT, so ``peft.get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` work with leanft configs.
"""

from . import methods, models
from .tuners import LamdaConfig, LorettaAdpConfig, LorettaRepConfig

__all__ = ["LamdaConfig", "LorettaAdpConfig", "LorettaRepConfig", "methods", "models"]
__version__ = "0.1.0"
