"""The built-in strategies, one file each; `from strategies import EMA, Replay`."""

from strategies.der import DER, DERPP, DERConfig, DERPPConfig
from strategies.distill import Distill, DistillConfig
from strategies.ema import EMA, EMAConfig
from strategies.ewc import EWC, EWCConfig
from strategies.freeze import Freeze, FreezeConfig
from strategies.lora import LoRA, LoRAConfig
from strategies.naive import Naive
from strategies.replay import Replay, ReplayConfig

__all__ = ["DER", "DERPP", "EMA", "EWC", "DERConfig", "DERPPConfig", "Distill",
           "DistillConfig", "EMAConfig", "EWCConfig", "Freeze", "FreezeConfig", "LoRA",
           "LoRAConfig", "Naive", "Replay", "ReplayConfig"]
