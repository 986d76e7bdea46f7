"""leanft: ultra-low-parameter and memory-efficient fine-tuning of LLMs, as PEFT tuners.

Importing leanft registers its methods with PEFT, so ``peft.get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` work with leanft configs.
"""

from . import methods, models
from .tuners import LamdaConfig, LorettaAdpConfig, LorettaRepConfig

__all__ = ["LamdaCallback", "LamdaConfig", "LorettaAdpConfig", "LorettaRepConfig", "ZOSFTTrainer", "ZOTrainer",
           "methods", "models"]
__version__ = "0.1.0"
HF = ("LamdaCallback", "ZOTrainer", "ZOSFTTrainer", "ZOTrainingMixin")


def __getattr__(name: str):
    """The Trainer integration (``leanft.hf``) loads on first use: ``import leanft`` stays light."""
    if name in HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'leanft' has no attribute {name!r}")
