"""mae_core: the MAE trainer as a library (model, masking, data, FSDP2, checkpoints).

It never imports the orchestrator, so the trainer can be used on its own. Import what you need
from its modules (``mae_core.model``, ``mae_core.config``, ...): the package itself imports
nothing, so light users (configs, storage) do not pay for importing torch.
"""
