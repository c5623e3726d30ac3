"""modalign: self-supervised multimodal representation learning.

The core library (data, nn, encoders, fusion, alignment, objectives, methods, eval) imports
without the training stack or the CLI.
"""

from modalign.core import Batch, EncoderOutput, LossOutput, Outputs, available, create

__version__ = "0.1.0"

__all__ = ["Batch", "EncoderOutput", "LossOutput", "Outputs", "__version__", "available", "create"]
