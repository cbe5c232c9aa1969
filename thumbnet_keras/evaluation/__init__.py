"""Evaluation utilities: FLOPs (multiply-adds) and parameter counts."""

from thumbnet_keras.evaluation.flops import count_flops, count_params

__all__ = ["count_flops", "count_params"]
