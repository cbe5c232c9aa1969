"""thumbnet-keras: ThumbNet (Zhao & Ghanem, ACM MM 2020) for Keras 3.

A learned downscaler E turns a full-size image into a thumbnail that keeps what
matters for recognition; an inference network S (the teacher's architecture at
thumbnail size) classifies it. A frozen teacher T guides training with four
losses: classification (CL), distillation (KD), feature mapping (FM) and moment
matching (MM).

The public API is re-exported here by hand. Nothing in this package imports
TensorFlow except `thumbnet_keras.data`, which is imported lazily.
"""

# Imported on first use (PEP 562), so `import thumbnet_keras.cli` and
# `thumbnet --help` do not start Keras or a backend.
_LAZY = {
    "count_flops": "thumbnet_keras.evaluation.flops",
    "count_params": "thumbnet_keras.evaluation.flops",
    "auto_downscaler_width": "thumbnet_keras.layers.downscaler",
    "bicubic_downscaler": "thumbnet_keras.layers.downscaler",
    "build_downscaler": "thumbnet_keras.layers.downscaler",
    "classification_loss": "thumbnet_keras.losses.thumbnet_losses",
    "distillation_loss": "thumbnet_keras.losses.thumbnet_losses",
    "feature_mapping_loss": "thumbnet_keras.losses.thumbnet_losses",
    "moment_matching_loss": "thumbnet_keras.losses.thumbnet_losses",
    "backbones": "thumbnet_keras.models.backbones",  # the module itself
    "make_student": "thumbnet_keras.models.student",
    "ThumbNetTrainer": "thumbnet_keras.models.trainer",
    "DownscalerPretrainer": "thumbnet_keras.models.downscaler_pretrainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if _LAZY[name].endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "DownscalerPretrainer",
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
