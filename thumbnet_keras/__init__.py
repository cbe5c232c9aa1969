"""thumbnet-keras: ThumbNet (Zhao & Ghanem, ACM MM 2020) for Keras 3.

A learned downscaler E turns a full-size image into a thumbnail that keeps what
matters for recognition; an inference network S (the teacher's architecture at
thumbnail size) classifies it. A frozen teacher T guides training with four
losses: classification (CL), distillation (KD), feature mapping (FM) and moment
matching (MM).

The public API is re-exported here by hand. Nothing in this package imports
TensorFlow except `thumbnet_keras.data`, which is imported lazily.
"""

from thumbnet_keras.evaluation.flops import count_flops, count_params
from thumbnet_keras.layers.downscaler import (
    auto_downscaler_width,
    bicubic_downscaler,
    build_downscaler,
)
from thumbnet_keras.losses.thumbnet_losses import (
    classification_loss,
    distillation_loss,
    feature_mapping_loss,
    moment_matching_loss,
)
from thumbnet_keras.models import backbones
from thumbnet_keras.models.student import make_student
from thumbnet_keras.models.trainer import ThumbNetTrainer

__version__ = "0.1.0"

__all__ = [
    "ThumbNetTrainer",
    "auto_downscaler_width",
    "backbones",
    "bicubic_downscaler",
    "build_downscaler",
    "classification_loss",
    "count_flops",
    "count_params",
    "distillation_loss",
    "feature_mapping_loss",
    "make_student",
    "moment_matching_loss",
]
