from thumbnet_keras.layers.downscaler import (
    auto_downscaler_width,
    bicubic_downscaler,
    build_downscaler,
    validate_image_shape,
)

__all__ = [
    "auto_downscaler_width",
    "bicubic_downscaler",
    "build_downscaler",
    "validate_image_shape",
]
