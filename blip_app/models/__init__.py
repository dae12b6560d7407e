"""torch and transformers live here: the engine (a loaded captioning model), the image-text matching
model, hardware detection, CPU accelerations, and the model manager."""

import logging

# transformers imports torchao whenever it is installed, and torchao 0.18 registers two Enum classes as
# pytree constants, which torch 2.14 logs as deprecated on every start (a warning nobody can act on, on
# every command's stderr). Set before torch is imported, since torch configures its loggers then.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
