"""Score distillation for editing: SDS, DDS and PiVa with dual LoRA adapters."""

from piva.guidance.adapters import SOURCE, TARGET, DualAdapters, depth_to_control
from piva.guidance.schedule import AnnealedTimesteps, sds_weight
from piva.guidance.score import MODES, GuidanceConfig, GuidanceOutput, ScoreDistillation

__all__ = [
    "SOURCE", "TARGET", "DualAdapters", "depth_to_control", "AnnealedTimesteps", "sds_weight",
    "MODES", "GuidanceConfig", "GuidanceOutput", "ScoreDistillation",
]
