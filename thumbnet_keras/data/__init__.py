"""Data layer: manifests, sources, validation, the Parquet index, tf.data pipelines.

Typical use:

    from thumbnet_keras import data

    manifest = data.load_manifest("elpv")            # data_manifests/elpv.yaml
    prepared = data.prepare(manifest, "work/elpv")    # validate, split, index
    train = data.make_dataset(prepared, "train", 224, 32, training=True)

TensorFlow (tf.data, TFDS) is imported only when a pipeline is built or a TFDS
manifest is prepared, so importing this module is cheap on any Keras backend.
"""

from thumbnet_keras.data.index import IndexCorruptError, PreparedDataset
from thumbnet_keras.data.manifest import (
    Manifest,
    ManifestError,
    load_manifest,
    manifest_dirs,
)
from thumbnet_keras.data.pipeline import (
    NO_AUGMENT,
    Augment,
    make_dataset,
    normalization_layer,
)
from thumbnet_keras.data.prepare import PrepareError, prepare
from thumbnet_keras.data.sources import DataSourceError
from thumbnet_keras.data.splits import stratified_holdout
from thumbnet_keras.data.validate import Validation, validate_bytes

__all__ = [
    "NO_AUGMENT",
    "Augment",
    "DataSourceError",
    "IndexCorruptError",
    "Manifest",
    "ManifestError",
    "PrepareError",
    "PreparedDataset",
    "Validation",
    "load_manifest",
    "make_dataset",
    "manifest_dirs",
    "normalization_layer",
    "prepare",
    "stratified_holdout",
    "validate_bytes",
]
