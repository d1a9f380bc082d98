"""The built-in strategies, one file each; `from strategies import EMA, Replay`."""

from strategies.agem import AGEM, AGEMConfig
from strategies.der import DER, DERPP, DERConfig, DERPPConfig
from strategies.distill import Distill, DistillConfig
from strategies.ema import EMA, EMAConfig
from strategies.er_ace import ERACE, ERACEConfig
from strategies.ewc import EWC, EWCConfig
from strategies.freeze import Freeze, FreezeConfig
from strategies.lora import LoRA, LoRAConfig
from strategies.naive import Naive
from strategies.ncm import NCM, NCMConfig
from strategies.prompt import Prompt, PromptConfig
from strategies.ranpac import RanPAC, RanPACConfig
from strategies.replay import Replay, ReplayConfig
from strategies.si import SI, SIConfig
from strategies.train_mask import TrainMask

__all__ = ["AGEM", "DER", "DERPP", "EMA", "ERACE", "EWC", "SI", "AGEMConfig", "DERConfig",
           "DERPPConfig", "Distill", "DistillConfig", "EMAConfig", "ERACEConfig", "EWCConfig",
           "Freeze", "FreezeConfig", "LoRA", "LoRAConfig", "NCM", "NCMConfig", "Naive", "Prompt",
           "PromptConfig", "RanPAC", "RanPACConfig", "Replay", "ReplayConfig", "SIConfig",
           "TrainMask"]
