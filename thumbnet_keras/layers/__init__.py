from thumbnet_keras.layers.downscaler import (
    bicubic_downscaler,
    build_downscaler,
    validate_image_shape,
)

__all__ = ["bicubic_downscaler", "build_downscaler", "validate_image_shape"]
