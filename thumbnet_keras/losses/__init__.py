from thumbnet_keras.losses.thumbnet_losses import (
    adaptive_average_pool,
    classification_loss,
    distillation_loss,
    feature_mapping_loss,
    moment_matching_loss,
)

__all__ = [
    "adaptive_average_pool",
    "classification_loss",
    "distillation_loss",
    "feature_mapping_loss",
    "moment_matching_loss",
]
