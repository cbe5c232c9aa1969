"""make_dataset: shapes, dtypes, golden values, determinism, and a fit step."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from data_fixtures import folder_manifest, make_image_folder, write_good
from PIL import Image, ImageDraw

from thumbnet_keras import data


def _manifest(root, name="toy", **split) -> data.Manifest:
    # These tests are about the stream, not the split: a quarter for test.
    return folder_manifest(root, name, **({"test_fraction": 0.25} | split))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_image_folder(root / "src", per_class=12, with_bad=True)
    return data.prepare(_manifest(root / "src"), root / "out")


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """8x8 images: border 0, central 4x4 block of value v (gray and RGB)."""
    root = tmp_path_factory.mktemp("golden")
    for name, mode in [("gray", "L"), ("rgb", "RGB")]:
        for j in range(2):
            arr = np.zeros((8, 8), np.uint8)
            arr[2:6, 2:6] = 51
            img = Image.fromarray(arr)
            path = root / "src" / name / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            (img if mode == "L" else img.convert("RGB")).save(path)
    return data.prepare(
        _manifest(root / "src", name="golden", test_fraction=0.5), root / "out"
    )


def _all(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_shapes_dtypes_and_ranges(toy):
    ds = data.make_dataset(toy, "train", (20, 24), 5, training=True, seed=1)
    batches = list(ds)
    assert sum(len(y) for _, y in batches) == toy.splits["train"]
    x, y = batches[0]
    assert tuple(x.shape) == (5, 20, 24, 3) and x.dtype.name == "float32"
    assert tuple(y.shape) == (5,) and y.dtype.name == "int32"
    images, labels = _all(ds)
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05
    assert set(labels.tolist()) == {0, 1}
    sym, _ = _all(
        data.make_dataset(toy, "test", 16, 4, False, normalization="symmetric")
    )
    assert -1.0 <= sym.min() < -0.5 and 0.5 < sym.max() <= 1.0


@pytest.mark.parametrize(
    "normalization, channels, expected",
    [
        ("unit", 3, [0.2, 0.2, 0.2]),
        ("symmetric", 1, [51 / 127.5 - 1]),
        (
            "imagenet",
            3,
            [(0.2 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (0.2 - 0.406) / 0.225],
        ),
        ("imagenet", 1, [(0.2 - 0.449) / 0.226]),
    ],
)
def test_golden_center_crop_and_normalization(
    golden, normalization, channels, expected
):
    # center_crop=0.5 keeps exactly the central 4x4 block (value 51) of each 8x8 image.
    x, _ = _all(
        data.make_dataset(
            golden,
            "test",
            4,
            8,
            False,
            channels=channels,
            normalization=normalization,
            center_crop=0.5,
        )
    )
    assert x.shape == (2, 4, 4, channels)
    np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), atol=1e-5)
    # Without the crop the zero border is in view: the mean drops.
    full, _ = _all(data.make_dataset(golden, "test", 4, 8, False, channels=channels))
    assert full.mean() < 0.2 - 0.05


def test_normalization_layer_matches_the_pipeline(toy):
    layer = data.normalization_layer("imagenet", 3)
    raw, _ = _all(data.make_dataset(toy, "test", 16, 8, False, normalization="unit"))
    normed, _ = _all(
        data.make_dataset(toy, "test", 16, 8, False, normalization="imagenet")
    )
    via_layer = keras.ops.convert_to_numpy(
        layer(keras.ops.convert_to_tensor(raw * 255.0))
    )
    np.testing.assert_allclose(via_layer, normed, atol=1e-4)


def test_gray_to_three_channels_and_rgb_to_one(tmp_path):
    write_good(tmp_path / "src/g/a.png", seed=1, channels=1)
    write_good(tmp_path / "src/g/b.png", seed=2, channels=1)
    write_good(tmp_path / "src/c/a.png", seed=3, channels=3)
    write_good(tmp_path / "src/c/b.png", seed=4, channels=3)
    prepared = data.prepare(
        _manifest(tmp_path / "src", test_fraction=0.5), tmp_path / "out"
    )
    x3, y = _all(data.make_dataset(prepared, "train", 12, 4, False, channels=3))
    gray = y == prepared.class_names.index("g")
    np.testing.assert_array_equal(x3[gray][..., 0], x3[gray][..., 2])
    assert np.abs(x3[~gray][..., 0] - x3[~gray][..., 2]).max() > 0.1
    x1, _ = _all(data.make_dataset(prepared, "train", 12, 4, False, channels=1))
    assert x1.shape[-1] == 1
    np.testing.assert_allclose(x1[gray][..., 0], x3[gray][..., 0], atol=1e-6)


def test_deterministic_under_a_seed_and_different_each_epoch(toy):
    def epochs(seed, n=2, **kw):
        ds = data.make_dataset(toy, "train", 16, 4, True, seed=seed, **kw)
        return [_all(ds) for _ in range(n)]

    a, b = epochs(7), epochs(7)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[1][0])  # epoch 2 reshuffled and re-augmented
    other = epochs(8, n=1)[0]
    assert not np.array_equal(a[0][0], other[0])
    cached = epochs(7, cache=True)
    np.testing.assert_array_equal(cached[1][0], a[1][0])


def test_a_wide_photo_is_trained_on_the_square_it_is_scored_on(tmp_path):
    """A practitioner's trial (2026-12-01): for a photo wider than ~5:3 no
    crop keeps 80% of the whole frame at aspect <= 4/3, TensorFlow then
    returned the whole image, and the resize squashed it (a disc 30 px wide
    and 75 tall), while evaluation and predict take the central square (75
    by 75). Training crops are now drawn inside that square."""
    for name, size in (("wide", (600, 240)), ("tall", (240, 600))):
        for i in range(2):
            image = Image.new("L", size, 0)
            w, h = size
            ImageDraw.Draw(image).ellipse(
                (w // 2 - 100, h // 2 - 100, w // 2 + 100, h // 2 + 100), fill=255
            )
            (tmp_path / "src" / name).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "src" / name / f"{i}.png")
    prepared = data.prepare(
        _manifest(tmp_path / "src", test_fraction=0.5), tmp_path / "out"
    )
    plain = data.Augment(flip_left_right=False, brightness=0.0, contrast=0.0)

    def extents(images):
        white = images[..., 0] > 0.5
        return [(m.any(0).sum(), m.any(1).sum()) for m in white]  # (width, height)

    scored, _ = _all(data.make_dataset(prepared, "test", 60, 4, False, channels=1))
    assert all(abs(w - h) <= 1 for w, h in extents(scored))  # a round disc
    for seed in range(5):
        trained, _ = _all(
            data.make_dataset(prepared, "train", 60, 4, True, channels=1,
                              augment=plain, seed=seed)
        )  # fmt: skip
        for w, h in extents(trained):  # at most the crop's 4/3 aspect apart
            assert 0.7 <= w / h <= 1.45, (seed, w, h)


def test_evaluation_is_unshuffled_and_unaugmented(toy):
    x1, y1 = _all(data.make_dataset(toy, "test", 16, 3, False, seed=1))
    x2, y2 = _all(data.make_dataset(toy, "test", 16, 3, False, seed=2))
    np.testing.assert_array_equal(x1, x2)
    rows = [r for r in toy.read_index().to_pylist() if r["split"] == "test"]
    assert y1.tolist() == [r["label"] for r in rows]


def test_a_sample_depends_on_its_seed_alone(toy):
    """An edge deployer's trial (2026-11-30): the int8 calibration set was
    drawn with tf.data's shuffle(seed=0), which also follows TensorFlow's
    global seed, so `thumbnet export` calibrated on other images than the
    flow that had seeded it. `sample` draws with NumPy from `seed` alone."""
    import tensorflow as tf

    rows = [r for r in toy.read_index().to_pylist() if r["split"] == "train"]
    draws = []
    for global_seed in (1, 2):
        tf.random.set_seed(global_seed)
        draws.append(_all(data.make_dataset(toy, "train", 16, 4, False, sample=5)))
    np.testing.assert_array_equal(draws[0][0], draws[1][0])
    assert len(draws[0][1]) == 5
    other = _all(data.make_dataset(toy, "train", 16, 4, False, sample=5, seed=1))
    assert not np.array_equal(other[0], draws[0][0])
    assert len(set(draws[0][1].tolist())) > 1  # across the split, not its head
    assert len(rows) > 5


def test_bad_arguments_name_the_argument(toy):
    with pytest.raises(ValueError, match="channels must be 1 or 3, received 2"):
        data.make_dataset(toy, "train", 8, 2, True, channels=2)
    with pytest.raises(ValueError, match="normalization must be one of"):
        data.make_dataset(toy, "train", 8, 2, True, normalization="caffe")
    with pytest.raises(ValueError, match="split 'validation' .* is empty"):
        data.make_dataset(toy, "validation", 8, 2, True)
    with pytest.raises(ValueError, match="crop_area"):
        data.Augment(crop_area=(0.0, 1.0))


def test_fit_step_on_real_elpv(tmp_path):
    prepared = data.prepare("elpv", tmp_path, limit_per_class=4)
    ds = data.make_dataset(prepared, "train", 32, 4, training=True, channels=1)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            keras.layers.Conv2D(4, 3, strides=2, name="conv"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dense(prepared.num_classes, name="logits"),
        ]
    )
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False if keras.backend.backend() == "torch" else "auto",
    )
    history = model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])


def test_rot90_turns_each_image_by_a_multiple_of_90_degrees(toy):
    plain = data.Augment(
        crop_area=(1.0, 1.0), flip_left_right=False, brightness=0.0, contrast=0.0
    )
    turned = data.Augment(**{**plain.__dict__, "rot90": True})
    ref, _ = _all(
        data.make_dataset(toy, "train", 12, 4, True, shuffle=False, augment=plain)
    )
    ds = data.make_dataset(toy, "train", 12, 4, True, shuffle=False, augment=turned)
    seen = set()
    for _ in range(2):  # Two epochs: new draws.
        x, _ = _all(ds)
        for a, r in zip(x, ref):
            ks = [k for k in range(4) if np.allclose(a, np.rot90(r, k), atol=1e-6)]
            assert ks, "an output is not a 90-degree rotation of its input"
            seen.add(ks[0])
    assert len(seen) >= 3
    with pytest.raises(ValueError, match="rot90=True\\) needs a square"):
        data.make_dataset(toy, "train", (12, 16), 4, True, augment=turned)


def _asymmetric(height=3, width=5) -> np.ndarray:
    """Every pixel different, so each flip and turn is told apart."""
    values = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    return (values * 5) % 251


def _tagged(stored: np.ndarray, orientation: int) -> Image.Image:
    """`stored` as a PNG whose EXIF orientation is `orientation`, reopened."""
    import io

    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif)
    buf.seek(0)
    return Image.open(buf)


def test_apply_orientation_golden_against_pil_exif_transpose():
    # The phone case: pixels stored as the sensor read them, an EXIF tag
    # says how to turn them. PIL's exif_transpose is the reference.
    from PIL import ImageOps

    from thumbnet_keras.data.pipeline import apply_orientation

    stored = _asymmetric()
    for orientation in range(1, 9):
        expected = np.asarray(ImageOps.exif_transpose(_tagged(stored, orientation)))
        got = np.asarray(apply_orientation(stored, orientation))
        np.testing.assert_array_equal(got, expected, err_msg=str(orientation))
    assert np.asarray(apply_orientation(stored, 6)).shape == (5, 3, 3)
    np.testing.assert_array_equal(np.asarray(apply_orientation(stored, 0)), stored)


def test_exif_orientation_is_applied_in_training_and_in_predict(tmp_path):
    # A phone JPEG tagged "rotate 90 clockwise" trained sideways and was
    # classified sideways (tf.io.decode_image ignores EXIF).
    from PIL import ImageOps

    from thumbnet_keras.predict import _load_image

    stored = np.kron(_asymmetric(6, 10), np.ones((2, 2, 1), np.uint8))  # 12x20
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    tagged_image = _tagged(stored, 6)
    tagged_image.save(root / "a" / "tagged.png", exif=tagged_image.getexif())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(root / "a" / "tagged.png")))
    assert upright.shape == (20, 12, 3)
    Image.fromarray(upright).save(root / "a" / "upright.png")
    write_good(root / "b" / "other.png", seed=3)
    write_good(root / "b" / "another.png", seed=4)
    prepared = data.prepare(_manifest(root, test_fraction=0.0), tmp_path / "out")
    rows = prepared.read_index().to_pylist()
    by_key = {r["key"]: r for r in rows}
    tagged, plain = by_key["a/tagged.png"], by_key["a/upright.png"]
    assert (tagged["orientation"], plain["orientation"]) == (6, 1)
    assert (tagged["width"], tagged["height"]) == (12, 20)  # as displayed
    # Evaluation streams keep the index's order.
    stream = data.make_dataset(prepared, "train", 8, 4, training=False)
    images = np.concatenate([np.asarray(x) for x, _ in stream])
    order = [r["key"] for r in rows if r["split"] == "train"]
    decoded = dict(zip(order, images, strict=True))
    np.testing.assert_array_equal(decoded["a/tagged.png"], decoded["a/upright.png"])
    # predict reads the file the same way.
    a, _ = _load_image(str(root / "a" / "tagged.png"), 8, 8, 3)
    b, _ = _load_image(str(root / "a" / "upright.png"), 8, 8, 3)
    np.testing.assert_array_equal(a, b)
    c, _ = _load_image(str(root / "b" / "other.png"), 8, 8, 3)
    assert not np.array_equal(a, c)
