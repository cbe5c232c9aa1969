"""`make_dataset`: tf.data pipelines of (image, label) batches for `fit`.

Steps: read (file, in-index bytes or TFDS record) -> decode to uint8 with 1 or 3
channels -> [cache] -> [shuffle] -> crop and resize -> [flip, brightness,
contrast when training] -> normalize -> batch -> prefetch.

Randomness is stateless: every element gets its own seed pair from
`tf.data.Dataset.random(seed, rerandomize_each_iteration=True)` zipped in
after the shuffle, and all random ops are `tf.image.stateless_*`. The stream
is therefore identical for the same `seed` whatever the number of parallel
map calls, and different in every epoch. (Keras 3 random preprocessing layers
draw from one shared SeedGenerator, so inside a parallel `map` their results
depend on thread scheduling; that is why they are not used here.)

Normalization uses Keras 3 preprocessing layers (`keras.layers.Rescaling`,
`keras.layers.Normalization`), which run inside tf.data on every backend;
`normalization_layer` returns the same layer so a teacher or an exported model
can embed exactly the preprocessing the pipeline applied.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from thumbnet_keras.data.index import PreparedDataset
from thumbnet_keras.data.validate import QUARANTINED

# "raw": pixels in [0, 255] unchanged, for a model that normalizes inside (a
# teacher with its own preprocessing, `models.teachers`).
NORMALIZATIONS = ("unit", "symmetric", "imagenet", "raw")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One-channel version: the means of the RGB statistics.
IMAGENET_GRAY_MEAN = (0.449,)
IMAGENET_GRAY_STD = (0.226,)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Light training augmentation (all stateless, seeded per element).

    Args:
        crop_area: (min, max) fraction of the image area kept by the random
            crop; (1.0, 1.0) disables cropping. Default (0.8, 1.0): light,
            so thin defects (ELPV cracks) mostly stay in view.
        crop_aspect: (min, max) aspect ratio of the random crop.
        flip_left_right: random horizontal flip.
        flip_up_down: random vertical flip (off by default; on for ELPV-like
            data with no up/down orientation is reasonable).
        rot90: random rotation by a multiple of 90 degrees (k in {0, 1, 2, 3},
            uniform; off by default). Needs a square output size. With both
            flips it draws uniformly from the 8 symmetries of the square,
            e.g. for solar cells, whose busbars run either way.
        brightness: max absolute delta on the [0, 1] scale (0 disables).
        contrast: max relative contrast change, factor in [1-c, 1+c] (0 disables).
    """

    crop_area: tuple[float, float] = (0.8, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip_left_right: bool = True
    flip_up_down: bool = False
    rot90: bool = False
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.crop_area
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"crop_area must satisfy 0 < min <= max <= 1, received {self.crop_area}"
            )
        if self.brightness < 0 or self.contrast < 0 or self.contrast >= 1:
            raise ValueError(
                f"brightness must be >= 0 and contrast in [0, 1), received "
                f"brightness={self.brightness}, contrast={self.contrast}"
            )


NO_AUGMENT = Augment(
    crop_area=(1.0, 1.0), flip_left_right=False, brightness=0.0, contrast=0.0
)


def normalization_layer(normalization: str = "unit", channels: int = 3):
    """The Keras layer mapping uint8-valued float images [0, 255] to model input.

    Args:
        normalization: "unit" -> [0, 1]; "symmetric" -> [-1, 1];
            "imagenet" -> ((x / 255) - mean) / std with the torchvision /
            keras-hub ImageNet statistics (gray: their RGB means); "raw" ->
            unchanged (scale 1).
        channels: 1 or 3.

    Returns:
        A `keras.layers.Rescaling` or `keras.layers.Normalization`.
    """
    import keras

    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS}, received {normalization!r}"
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, received {channels}")
    if normalization == "raw":
        return keras.layers.Rescaling(1.0, name="normalize_raw")
    if normalization == "unit":
        return keras.layers.Rescaling(1.0 / 255.0, name="normalize_unit")
    if normalization == "symmetric":
        return keras.layers.Rescaling(
            1.0 / 127.5, offset=-1.0, name="normalize_symmetric"
        )
    mean = IMAGENET_MEAN if channels == 3 else IMAGENET_GRAY_MEAN
    std = IMAGENET_STD if channels == 3 else IMAGENET_GRAY_STD
    layer = keras.layers.Normalization(
        mean=[255.0 * m for m in mean],
        variance=[(255.0 * s) ** 2 for s in std],
        name="normalize_imagenet",
    )
    # Built eagerly: on JAX/torch a Normalization first called inside tf.data
    # cannot build itself there.
    layer.build((None, None, None, channels))
    return layer


def value_range(normalization: str) -> tuple[float, float] | None:
    """The range of a normalization's images, where thumbnails are clipped:
    (0, 1) for "unit", (0, 255) for "raw", None for the mean/std ones."""
    return {"unit": (0.0, 1.0), "raw": (0.0, 255.0)}.get(normalization)


def raw_pixel_model(models, normalization: str, channels: int, name: str):
    """`pixels [0, 255] -> normalization_layer(normalization) -> models[0] ->
    models[1] ...` as one Functional model of built-in layers: a model
    trained on `make_dataset(..., normalization=normalization)` batches that
    takes raw pixels (uint8 or float) at the size of `models[0]`'s input.

    For "raw" the first layer is `ReLU(max_value=255)` (`pixel_range`), the
    identity on pixels: without a layer of its own in front, LiteRT's int8
    quantizer gives the input tensor the scale of the first ops it feeds
    (E's space-to-depth and its concatenation with the bicubic thumbnail,
    whose range overshoots [0, 255] at edges), so the uint8 input would not
    be the pixel itself (scale 1.08, zero point 8 on a run's images).
    """
    import keras

    shape = tuple(models[0].inputs[0].shape[1:])
    pixels = keras.Input(shape, name="pixels")
    x = pixels
    if normalization == "raw":
        x = keras.layers.ReLU(max_value=255.0, name="pixel_range")(x)
    else:
        x = normalization_layer(normalization, channels)(x)
    for model in models:
        x = model(x)
    return keras.Model(pixels, x, name=name)


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(
            f"image_size must be an int or (height, width), received {image_size!r}"
        )
    return size


def _source(prepared: PreparedDataset, split: str, sample=None, seed: int = 0):
    """(dataset of (encoded bytes, label, EXIF orientation), number of
    examples); with `sample`, that many examples of the split, drawn by a
    NumPy generator seeded with `seed`, in index order."""
    import tensorflow as tf

    table = prepared.read_index(
        [
            "image_uri",
            "image_bytes",
            "label",
            "split",
            "status",
            "tfds_split",
            "tfds_index",
            "orientation",
        ]
    ).to_pydict()
    keep = [
        i
        for i, (s, st) in enumerate(zip(table["split"], table["status"], strict=True))
        if s == split and st != QUARANTINED
    ]
    if not keep:
        raise ValueError(
            f"split {split!r} of {prepared.name} is empty; available: {prepared.splits}"
        )
    if sample is not None and sample < len(keep):
        chosen = np.random.default_rng(seed).choice(len(keep), sample, replace=False)
        keep = [keep[i] for i in sorted(chosen)]
    if prepared.source_type == "tfds":
        from thumbnet_keras.data import tfds_source
        from thumbnet_keras.data.manifest import TfdsSource

        source = TfdsSource.model_validate(prepared.manifest["source"])
        parts = []
        for tfds_split in sorted({table["tfds_split"][i] for i in keep}):
            wanted = np.zeros(max(table["tfds_index"]) + 1, dtype=bool)
            for i in keep:
                if table["tfds_split"][i] == tfds_split:
                    wanted[table["tfds_index"][i]] = True
            mask = tf.constant(wanted)
            ds = tfds_source.split_dataset(source, tfds_split).enumerate()
            last = len(wanted) - 1

            def keep_fn(i, ex, m=mask, last=last):
                return (i <= last) & tf.gather(m, tf.minimum(i, last))

            ds = ds.filter(keep_fn)
            parts.append(
                ds.map(lambda i, ex: (ex[0], tf.cast(ex[1], tf.int32), tf.constant(1)))
            )  # TFDS examples: as the builder stored them (no EXIF rotation)
        ds = parts[0]
        for part in parts[1:]:
            ds = ds.concatenate(part)
        return ds, len(keep)

    uris = [prepared.image_path(table["image_uri"][i]) or "" for i in keep]
    blobs = [table["image_bytes"][i] or b"" for i in keep]
    labels = np.asarray([table["label"][i] for i in keep], dtype=np.int32)
    turns = np.asarray([table["orientation"][i] or 1 for i in keep], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((uris, blobs, labels, turns))

    def read(uri, blob, label, orientation):
        data = tf.cond(
            tf.strings.length(uri) > 0, lambda: tf.io.read_file(uri), lambda: blob
        )
        return data, label, orientation

    return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE), len(keep)


# Decoded, cached sources, shared by every stream built on them: tf.data shares
# a `cache()` with each pipeline built on the same dataset object, so a stage
# that builds one train stream per epoch (resume-exact seeds, issue 12)
# decodes its images once per process, not once per epoch. Most recent kept.
_SHARED_CACHES: dict = {}
_SHARED_CACHES_KEPT = 4


def _shared_cache(key: tuple, build):
    if key not in _SHARED_CACHES:
        while len(_SHARED_CACHES) >= _SHARED_CACHES_KEPT:
            _SHARED_CACHES.pop(next(iter(_SHARED_CACHES)))
        _SHARED_CACHES[key] = build()
    return _SHARED_CACHES[key]


def make_dataset(
    prepared: PreparedDataset | str | os.PathLike,
    split: str,
    image_size: int | Sequence[int],
    batch_size: int,
    training: bool,
    *,
    seed: int = 0,
    channels: int = 3,
    normalization: str | None = "unit",
    cache: bool = False,
    shuffle: bool | None = None,
    augment: Augment | bool | None = None,
    center_crop: float = 1.0,
    shuffle_buffer: int | None = None,
    sample: int | None = None,
):
    """A `tf.data.Dataset` of (image float32 (B, H, W, C), label int32 (B,)).

    Args:
        prepared: a `PreparedDataset` or its out_dir.
        split: "train", "validation" or "test" (see the manifest's
            `split.validation_fraction` for a fixed-seed stratified
            validation subset carved out of train).
        image_size: output size, int or (height, width).
        batch_size: examples per batch; the last batch may be smaller.
        training: apply augmentation (and shuffle by default).
        seed: seed of shuffle and augmentation; same seed, same stream.
        channels: 1 (gray; RGB is converted by luminance) or 3 (gray is
            repeated).
        normalization: "unit" [0, 1], "symmetric" [-1, 1], "imagenet"
            (mean/std), or None for the manifest's default. Use the same value
            the teacher was trained with; `normalization_layer` builds it.
        cache: cache decoded uint8 images in memory (after the first epoch no
            file is read or decoded again).
        shuffle: shuffle examples each epoch; default: `training`.
        augment: an `Augment`, True/None for the default `Augment()` when
            training, False for none. Ignored when `training` is False.
        center_crop: evaluation crop: keep this central fraction of the
            (aspect-matched) image before resizing, e.g. 0.875 for the usual
            ImageNet 256->224 protocol. Training crops come from `augment`.
        shuffle_buffer: default: the whole split for indexed sources, 10,000
            for TFDS.
        sample: only this many examples of the split, chosen with NumPy from
            `seed` alone (tf.data's shuffle also depends on TensorFlow's
            global seed; the int8 calibration set must not), in index order.

    Returns:
        A batched, prefetched `tf.data.Dataset`, deterministic given `seed`.
    """
    import tensorflow as tf

    if not isinstance(prepared, PreparedDataset):
        prepared = PreparedDataset.load(prepared)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, received {channels}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, received {batch_size}")
    if not 0 < center_crop <= 1:
        raise ValueError(f"center_crop must be in (0, 1], received {center_crop}")
    height, width = _size(image_size)
    normalization = normalization or prepared.normalization
    norm = normalization_layer(normalization, channels)
    if augment is None or augment is True:
        augment = Augment()
    if augment is False or not training:
        augment = NO_AUGMENT
    shuffle = training if shuffle is None else shuffle
    if augment.rot90 and height != width:
        raise ValueError(
            "Augment(rot90=True) needs a square image_size, received "
            f"image_size={image_size!r}"
        )

    ds, n = _source(prepared, split, sample, seed)

    def decode(data, label, orientation):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        image = apply_orientation(image, orientation)
        image.set_shape([None, None, channels])
        return image, label

    buffer = shuffle_buffer or (min(n, 10_000) if prepared.source_type == "tfds" else n)
    if cache:
        stat = os.stat(prepared.index_path)
        key = (os.path.abspath(prepared.out_dir), split, channels,
               stat.st_mtime_ns, stat.st_size, sample, sample and seed)  # fmt: skip
        ds = _shared_cache(
            key, lambda: ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
        )
    if shuffle:
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if not cache:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds))

    def transform(example, pair):
        image, label = example
        shape = tf.shape(image)
        if augment.crop_area != (1.0, 1.0):
            # Within the central crop of the output's aspect, the region
            # evaluation and predict see: over the whole frame, a photo wider
            # than ~5:3 fits no crop of 80% of its area at aspect <= 4/3, and
            # TensorFlow then returns the whole image, which the resize
            # squashed (a trial: 21 of 82 photos trained squashed, scored
            # cropped). A square image is its own central crop: unchanged.
            image = _center_crop(image, height / width, 1.0)
            shape = tf.shape(image)
            begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
                shape,
                bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                seed=pair,
                min_object_covered=0.0,
                aspect_ratio_range=augment.crop_aspect,
                area_range=augment.crop_area,
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            image = tf.slice(image, begin, crop_size)
        else:
            image = _center_crop(image, height / width, center_crop)
        image = tf.image.resize(
            image, (height, width), method="bilinear", antialias=True
        )
        image = tf.clip_by_value(image, 0.0, 255.0)
        if augment.flip_left_right:
            image = tf.image.stateless_random_flip_left_right(image, pair + [1, 0])
        if augment.flip_up_down:
            image = tf.image.stateless_random_flip_up_down(image, pair + [2, 0])
        if augment.rot90:
            k = tf.random.stateless_uniform(
                [], pair + [5, 0], minval=0, maxval=4, dtype=tf.int32
            )
            image = tf.image.rot90(image, k)
        if augment.brightness > 0:
            image = tf.image.stateless_random_brightness(
                image, 255.0 * augment.brightness, pair + [3, 0]
            )
        if augment.contrast > 0:
            c = augment.contrast
            image = tf.image.stateless_random_contrast(
                image, 1 - c, 1 + c, pair + [4, 0]
            )
        image = tf.clip_by_value(image, 0.0, 255.0)
        image.set_shape([height, width, channels])
        return image, tf.cast(label, tf.int32)

    def normalize(images, labels):
        return tf.cast(norm(images), tf.float32), labels

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def apply_orientation(image, orientation):
    """A decoded image `(H, W, C)` turned upright by its EXIF `orientation`
    (1-8, a scalar tensor or int; 1 and unknown values: unchanged), as
    `PIL.ImageOps.exif_transpose` turns it (`tf.io.decode_image` ignores EXIF)."""
    import tensorflow as tf

    def transverse():  # the anti-diagonal mirror
        return tf.image.rot90(tf.image.transpose(image), 2)

    branches = [
        lambda: image,  # 1 (and anything unknown)
        lambda: tf.image.flip_left_right(image),  # 2
        lambda: tf.image.rot90(image, 2),  # 3
        lambda: tf.image.flip_up_down(image),  # 4
        lambda: tf.image.transpose(image),  # 5
        lambda: tf.image.rot90(image, 3),  # 6: 90 degrees clockwise
        transverse,  # 7
        lambda: tf.image.rot90(image, 1),  # 8: 90 degrees counter-clockwise
    ]
    index = tf.cast(orientation, tf.int32) - 1
    index = tf.where((index < 0) | (index > 7), 0, index)
    return tf.switch_case(index, branches)


def _center_crop(image, aspect: float, fraction: float):
    """Central crop with the target aspect ratio (h/w), scaled by `fraction`."""
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    h, w = shape[0], shape[1]
    crop_h = tf.minimum(h, w * aspect) * fraction
    crop_w = tf.minimum(w, h / aspect) * fraction
    crop_h = tf.maximum(tf.cast(tf.round(crop_h), tf.int32), 1)
    crop_w = tf.maximum(tf.cast(tf.round(crop_w), tf.int32), 1)
    top = (tf.shape(image)[0] - crop_h) // 2
    left = (tf.shape(image)[1] - crop_w) // 2
    return tf.image.crop_to_bounding_box(image, top, left, crop_h, crop_w)
