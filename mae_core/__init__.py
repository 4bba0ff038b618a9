"""mae_core: the MAE trainer as a library (model, masking, data, FSDP2, checkpoints).

It never imports the orchestrator, so the trainer can be used on its own.
"""

from mae_core.config import TrainConfig
from mae_core.model import MODELS, MaskedAutoencoderViT, build_model

__all__ = ["MODELS", "MaskedAutoencoderViT", "TrainConfig", "build_model"]
