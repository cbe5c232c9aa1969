"""prepare: validation and quarantine of real bad files, reuse, atomic writes."""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    BAD_FILES,
    encode,
    folder_manifest,
    make_image_folder,
    pattern,
    write_bad_files,
    write_good,
)
from PIL import Image

from thumbnet_keras import data
from thumbnet_keras.data import index as index_module
from thumbnet_keras.data.validate import RULES_VERSION, validate_bytes


def rows_by_name(prepared) -> dict[str, dict]:
    return {os.path.basename(r["key"]): r for r in prepared.read_index().to_pylist()}


def test_planted_bad_files_get_right_status_and_reason(tmp_path):
    make_image_folder(tmp_path / "src")
    # The planted 16-bit PNG really is 16 bits deep (IHDR bit depth byte).
    assert (tmp_path / "src/cat/deep16.png").read_bytes()[24] == 16
    prepared = data.prepare(folder_manifest(tmp_path / "src"), tmp_path / "out")
    rows = rows_by_name(prepared)
    for name, (status, reason) in BAD_FILES.items():
        assert (rows[name]["status"], rows[name]["reason"]) == (status, reason), name
    report = json.loads(open(prepared.quarantine_path).read())
    quarantined = {
        os.path.basename(q["key"]): q["reason"] for q in report["quarantined"]
    }
    assert quarantined == {
        n: r for n, (s, r) in BAD_FILES.items() if s == "quarantined"
    }
    # Quarantined rows are excluded from every split; the 12 good + 3 converted remain.
    assert sum(prepared.splits.values()) == 15
    assert all(r["split"] == "" for r in rows.values() if r["status"] == "quarantined")


def test_undecodable_names_and_dangling_links_are_quarantined(tmp_path):
    # A Latin-1 file name crashed prepare (Arrow: "surrogates not allowed",
    # three tracebacks and two retries); a link to nothing was `not_a_file`.
    root = make_image_folder(tmp_path / "src", with_bad=False)
    write_good(root / "cat" / os.fsdecode(b"caf\xe9.jpg"), seed=7)
    (root / "dog" / "gone.jpg").symlink_to(root / "dog" / "deleted.jpg")
    os.fsencode(os.fsdecode(b"\xe9"))  # the file system takes such names
    prepared = data.prepare(folder_manifest(root), tmp_path / "out")
    rows = rows_by_name(prepared)
    assert (rows["caf\\xe9.jpg"]["status"], rows["caf\\xe9.jpg"]["reason"]) == (
        "quarantined",
        "non_utf8_path",
    )
    assert rows["caf\\xe9.jpg"]["key"] == "cat/caf\\xe9.jpg"  # escaped, readable
    assert (rows["gone.jpg"]["status"], rows["gone.jpg"]["reason"]) == (
        "quarantined",
        "missing",
    )
    report = json.loads(open(prepared.quarantine_path).read())
    assert sorted(q["reason"] for q in report["quarantined"]) == [
        "missing",
        "non_utf8_path",
    ]
    assert sum(prepared.splits.values()) == 12  # the good ones, all kept


def test_one_image_under_two_classes_is_a_label_conflict(tmp_path):
    # A byte copy filed under another class was reported only as train/test
    # leakage, or (both in train) only as a count in summary.json.
    root = make_image_folder(tmp_path / "src", with_bad=False)
    blob = (root / "cat" / "cat_00.png").read_bytes()
    (root / "dog" / "copy.png").write_bytes(blob)
    # A second copy in cat: the first two files are both cat's, and the text
    # quoted those, never dog's (an image folder trial).
    (root / "cat" / "cat_00_again.png").write_bytes(blob)
    with pytest.warns(UserWarning) as caught:
        prepared = data.prepare(folder_manifest(root), tmp_path / "out")
    texts = [str(w.message) for w in caught]
    conflict = [t for t in texts if "more than one class" in t]
    assert conflict == [
        "toy: 1 image(s) appear under more than one class (byte-identical files; "
        "e.g. 'cat/cat_00.png' as 'cat', 'dog/copy.png' as 'dog'), so training "
        "is taught two answers for one image. Keep each image under one class "
        "(every one is listed in summary.json's label_conflicts)."
    ]
    assert prepared.summary()["label_conflicts"][0]["keys"] == [
        "cat/cat_00.png",
        "cat/cat_00_again.png",
        "dog/copy.png",
    ]
    # Reused, the index still knows, and the run's notices say it again.
    from thumbnet_keras.pipeline.datasets import data_notices

    again = data.prepare(folder_manifest(root), tmp_path / "out")
    assert again.reused
    assert conflict[0] in data_notices(again.out_dir)


def test_converted_files_are_8bit_pngs_with_the_same_pixels(tmp_path):
    make_image_folder(tmp_path / "src")
    prepared = data.prepare(folder_manifest(tmp_path / "src"), tmp_path / "out")
    rows = rows_by_name(prepared)
    deep = Image.open(prepared.image_path(rows["deep16.png"]["image_uri"]))
    assert deep.mode == "L" and deep.format == "PNG"
    np.testing.assert_array_equal(np.asarray(deep), pattern(16, 16, 1, 5))
    palette = Image.open(prepared.image_path(rows["palette.png"]["image_uri"]))
    original = Image.open(tmp_path / "src/cat/palette.png").convert("RGB")
    assert palette.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(palette), np.asarray(original))
    assert rows["picture.bmp"]["channels"] == 3


def test_relative_paths_are_recorded_so_the_index_reads_from_anywhere(
    tmp_path, monkeypatch
):
    """Prepared from relative paths (root and out_dir), the index names its
    source files absolutely and its converted files relative to the prepared
    folder: it reads from another working folder, and after the prepared
    folder is moved."""
    import shutil

    make_image_folder(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    prepared = data.prepare(folder_manifest("src"), "cache/toy")
    assert prepared.out_dir == str(tmp_path / "cache" / "toy")
    rows = prepared.read_index().to_pylist()
    converted = [r for r in rows if r["status"] == "converted"]
    assert len(converted) == 3
    assert all(r["image_uri"] == f"converted/{r['sha256']}.png" for r in converted)
    sources = [r["image_uri"] for r in rows if r["status"] == "ok"]
    assert sources and all(u.startswith(str(tmp_path / "src")) for u in sources)

    def pixels(folder):
        ds = data.make_dataset(data.PreparedDataset.load(folder), "train", 8, 64, False)
        return np.concatenate([np.asarray(x) for x, _ in ds])

    expected = pixels(prepared.out_dir)
    assert len(expected) == prepared.splits["train"]
    monkeypatch.chdir(tmp_path / "src")  # another working folder
    np.testing.assert_array_equal(pixels(prepared.out_dir), expected)
    shutil.move(tmp_path / "cache", tmp_path / "moved")  # the cache moved
    np.testing.assert_array_equal(pixels(tmp_path / "moved" / "toy"), expected)


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda: encode(np.zeros((8, 8, 4), np.uint8) + 255, "PNG"),
            ("converted", "drop_opaque_alpha"),
        ),
        (lambda: _gif(frames=2), ("quarantined", "animated")),
        (lambda: _gif(frames=1), ("converted", "palette_to_rgb")),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ("quarantined", "corrupt")),
        (lambda: b"\xff\xd8", ("quarantined", "corrupt")),
        (lambda: b"GIF is a nice format", ("quarantined", "not_an_image")),
        (lambda: _damaged_png(), ("quarantined", "corrupt")),
        (lambda: encode(pattern(8, 8, 1, 0), "PNG"), ("ok", "")),
        # Cut before its IEND chunk: Pillow decodes it, TensorFlow refused it
        # in training with a traceback (an edge deployer's trial).
        (
            lambda: encode(pattern(8, 8, 3, 0), "PNG")[:-12],
            ("quarantined", "truncated"),
        ),
        # Bytes after IEND: TensorFlow and Pillow decode it.
        (lambda: encode(pattern(8, 8, 3, 0), "PNG") + b"trailer", ("ok", "")),
    ],
)
def test_more_formats(make, expected):
    v = validate_bytes(make())
    assert (v.status, v.reason) == expected


def _damaged_png() -> bytes:
    blob = bytearray(encode(pattern(32, 32, 3, 1), "PNG"))
    blob[60:80] = b"\xff" * 20  # inside the IDAT zlib stream
    return bytes(blob)


def _gif(frames: int) -> bytes:
    images = [Image.fromarray(pattern(8, 8, 3, i)).convert("P") for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:])
    return buf.getvalue()


def test_reprepare_is_skipped_when_nothing_changed_and_redone_for_a_changed_file(
    tmp_path,
):
    make_image_folder(tmp_path / "src")
    manifest = folder_manifest(tmp_path / "src")
    first = data.prepare(manifest, tmp_path / "out")
    assert (
        not first.reused and first.decoded == 20
    )  # 21 candidates; the directory is not read
    index_mtime = os.stat(first.index_path).st_mtime_ns
    second = data.prepare(manifest, tmp_path / "out")
    assert second.reused and second.decoded == 0
    assert os.stat(first.index_path).st_mtime_ns == index_mtime
    # Change one file's content: only that file is decoded again.
    write_good(tmp_path / "src/dog/dog_03.jpg", seed=12345)
    third = data.prepare(manifest, tmp_path / "out")
    assert not third.reused and third.decoded == 1
    # A file that becomes bad is re-validated and quarantined.
    (tmp_path / "src/dog/dog_00.png").write_bytes(b"")
    fourth = data.prepare(manifest, tmp_path / "out")
    assert rows_by_name(fourth)["dog_00.png"]["reason"] == "empty_file"
    assert sum(fourth.splits.values()) == 14


def test_manifest_change_redoes_the_index(tmp_path):
    make_image_folder(tmp_path / "src", with_bad=False)
    data.prepare(folder_manifest(tmp_path / "src"), tmp_path / "out")
    again = data.prepare(folder_manifest(tmp_path / "src", seed=7), tmp_path / "out")
    assert not again.reused and again.decoded == 0  # re-split, nothing re-decoded


def test_failure_mid_write_leaves_the_previous_index(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "src", with_bad=False)
    manifest = folder_manifest(tmp_path / "src")
    good = data.prepare(manifest, tmp_path / "out")
    before = index_module.file_sha256(good.index_path)
    write_good(tmp_path / "src/cat/cat_00.png", seed=999)

    real_write = pq.write_table

    def dying_write(table, where, **kw):
        real_write(table, where, **kw)
        with open(where, "r+b") as f:  # half a file, then the process "dies"
            f.truncate(os.path.getsize(where) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pq, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(manifest, tmp_path / "out")
    monkeypatch.setattr(pq, "write_table", real_write)
    assert index_module.file_sha256(good.index_path) == before
    assert [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p] == []
    assert data.PreparedDataset.load(tmp_path / "out").splits == good.splits
    redone = data.prepare(manifest, tmp_path / "out")
    assert not redone.reused and redone.decoded == 1


def test_a_half_written_index_is_never_trusted(tmp_path):
    make_image_folder(tmp_path / "src", with_bad=False)
    manifest = folder_manifest(tmp_path / "src")
    good = data.prepare(manifest, tmp_path / "out")
    with open(good.index_path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(data.IndexCorruptError, match="does not match"):
        data.PreparedDataset.load(tmp_path / "out")
    redone = data.prepare(manifest, tmp_path / "out")
    assert not redone.reused and redone.decoded == 12
    assert data.PreparedDataset.load(tmp_path / "out").splits == good.splits


def test_empty_split_fails_with_clear_message(tmp_path):
    root = tmp_path / "src"
    for folder in ("cat", "dog"):  # two classes (one is refused first)
        for name, (status, _) in write_bad_files(root / folder).items():
            if status == "converted":
                os.remove(root / folder / name)
    with pytest.raises(
        data.PrepareError, match="split 'train' has no usable example"
    ) as err:
        data.prepare(folder_manifest(root), tmp_path / "out")
    # Why, counted by reason (a trial: "231 quarantined" for a wrong base_dir).
    assert "quarantined: " in str(err.value) and " empty_file" in str(err.value)
    assert os.path.isfile(tmp_path / "out" / "quarantine.failed.json")
    assert not os.path.exists(tmp_path / "out" / "index.parquet")


def test_failed_reprepare_keeps_the_last_good_index_and_report(tmp_path):
    make_image_folder(tmp_path / "src")
    manifest = folder_manifest(tmp_path / "src")
    good = data.prepare(manifest, tmp_path / "out")
    out = tmp_path / "out"
    before = {
        name: (out / name).read_bytes()
        for name in ("index.parquet", "quarantine.json", "summary.json")
    }
    for path in (tmp_path / "src").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")  # every source file is now bad
    with pytest.raises(data.PrepareError, match="no usable example"):
        data.prepare(manifest, out)
    assert (out / "quarantine.failed.json").is_file()
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name
    assert data.PreparedDataset.load(out).splits == good.splits
    # Once the data is fixed, the failure's report goes (a trial: it stayed
    # beside the new index, a failure that no longer applied).
    make_image_folder(tmp_path / "src")
    assert data.prepare(manifest, out).reused  # the same files as the good one
    assert not (out / "quarantine.failed.json").exists()
    for path in (tmp_path / "src").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.raises(data.PrepareError, match="no usable example"):
        data.prepare(manifest, out)
    make_image_folder(tmp_path / "src")
    write_good(tmp_path / "src/dog/dog_03.jpg", seed=4321)  # a new index
    assert not data.prepare(manifest, out).reused
    assert not (out / "quarantine.failed.json").exists()


def test_declared_class_without_examples_fails(tmp_path):
    make_image_folder(tmp_path / "src", with_bad=False)
    manifest = folder_manifest(tmp_path / "src").model_copy(
        update={"classes": ["cat", "dog", "emu"]}
    )
    with pytest.raises(
        data.PrepareError,
        match=r"declared class\(es\) 'emu' \(no image\) have no usable",
    ):
        data.prepare(manifest, tmp_path / "out")


def test_a_class_folder_whose_files_all_fail_is_named_not_dropped(tmp_path):
    """A class folder of undecodable files used to vanish from the class
    list (a 2-class model from 3 folders, health "ok")."""
    root = make_image_folder(tmp_path / "src", with_bad=False)
    (root / "emu").mkdir()
    for i in range(3):
        (root / "emu" / f"e{i}.png").write_text("not an image")
    with pytest.raises(
        data.PrepareError, match=r"class folder\(s\) 'emu' \(3 not_an_image\) have no"
    ):
        data.prepare(folder_manifest(root), tmp_path / "out")


def test_one_class_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "src", classes=("cat",), with_bad=False)
    with pytest.raises(data.PrepareError, match=r"at least 2 classes.*has 1 \('cat'\)"):
        data.prepare(folder_manifest(root), tmp_path / "out")


def test_duplicates_across_splits_are_reported(tmp_path):
    root = make_image_folder(tmp_path / "src", with_bad=False, per_class=10)
    blob = (root / "cat/cat_00.png").read_bytes()
    for i in range(4):
        (root / f"cat/copy_{i}.png").write_bytes(blob)
    with pytest.warns(UserWarning) as warned:
        prepared = data.prepare(folder_manifest(root), tmp_path / "out")
    summary = prepared.summary()
    said = [str(w.message) for w in warned if "byte-identical" in str(w.message)]
    first = summary["duplicates_across_splits"][0]["examples"]
    assert sorted(first) == ["test", "train"]
    assert len(said) == 1 and said[0].startswith(
        "toy: 1 image(s) have byte-identical copies in more than one split "
        f"(5 files; e.g. {first['test']!r} in test, {first['train']!r} in train)"
    ), said
    assert "summary.json's duplicates_across_splits" in said[0]
    rows = [
        r
        for r in prepared.read_index().to_pylist()
        if r["sha256"] == index_module.hashlib.sha256(blob).hexdigest()
    ]
    splits = {r["split"] for r in rows}
    assert len(rows) == 5
    by_key = {r["key"]: r["split"] for r in rows}
    assert {by_key[k] for k in first.values()} == {"test", "train"}  # one of each
    if len(splits) > 1:
        assert summary["duplicates_across_splits"][0]["splits"] == sorted(splits)
        assert len(summary["duplicates_across_splits"][0]["keys"]) == 5
    else:
        assert summary["duplicates_within_split"] == 4
    assert splits == {"train", "test"}  # with seed 0 the copies straddle the split


def test_validation_fraction_carves_a_stratified_subset_of_train(tmp_path):
    make_image_folder(tmp_path / "src", with_bad=False, per_class=12)
    plain = data.prepare(folder_manifest(tmp_path / "src"), tmp_path / "a")
    carved = data.prepare(
        folder_manifest(tmp_path / "src", validation_fraction=0.25), tmp_path / "b"
    )
    assert plain.splits == {"train": 16, "test": 8}
    assert carved.splits == {"train": 12, "validation": 4, "test": 8}
    assert carved.summary()["per_class"]["validation"] == {"cat": 2, "dog": 2}

    def keys_of_test(p):
        return {r["key"] for r in p.read_index().to_pylist() if r["split"] == "test"}

    assert keys_of_test(plain) == keys_of_test(carved)  # test never changes


def test_default_validation_split_unless_the_source_has_one(tmp_path):
    make_image_folder(tmp_path / "src", with_bad=False, per_class=12)
    manifest = folder_manifest(tmp_path / "src").model_dump()
    del manifest["split"]["validation_fraction"]  # the default: 10% of train
    carved = data.prepare(data.Manifest.model_validate(manifest), tmp_path / "a")
    assert carved.splits == {"train": 14, "validation": 2, "test": 8}
    root = tmp_path / "own"
    for split in ("train", "validation", "test"):
        for c in ("a", "b"):
            for i in range(3):
                write_good(root / split / c / f"{i}.png", seed=i + 10 * (c == "b"))
    own = data.Manifest.model_validate(
        {
            "name": "own_validation",
            "description": "d",
            "license": "l",
            "source": {
                "type": "image_folder",
                "root": str(root),
                "split_dirs": {s: s for s in ("train", "validation", "test")},
            },
            "image": {"channels": 3},
            "split": {"test_fraction": 0.0},
        }
    )
    kept = data.prepare(own, tmp_path / "b")
    assert kept.splits == {"train": 6, "validation": 6, "test": 6}


def test_runs_and_prepared_data_inside_the_root_are_never_classes(tmp_path):
    """A first-contact trial (2026-11-30): with `root: .` and the default
    `./runs`, the second run trained on the first run's report images as a
    fourth class 'runs' (and a --data-dir inside the root gave its converted
    copies as a class). thumbnet's own run and prepared-data folders are
    skipped, said once, and the classes stay the image folders'."""
    root = tmp_path / "photos"
    for c in ("a", "b"):
        for i in range(4):
            write_good(root / c / f"{i}.png", seed=i + 10 * (c == "b"))
    first = data.prepare(folder_manifest(root), root / "prepared" / "toy-1")
    assert first.class_names == ["a", "b"]
    run = root / "runs" / "r1"  # a finished run: its record, report images
    (run / "stages").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    write_good(run / "report_images" / "curve.png", seed=7)
    write_good(root / "prepared" / "toy-1" / "converted" / "x.png", seed=8)
    manifest = folder_manifest(root)
    assert manifest.source.class_folders() == ["a", "b"]
    with pytest.warns(UserWarning, match=r"skipped 'prepared', 'runs' under .*never"):
        again = data.prepare(manifest, tmp_path / "out")
    assert again.class_names == ["a", "b"]
    assert sum(again.splits.values()) == 8
    # Prepared data two levels down (runs/_data/<name>, the runs deleted).
    import shutil

    shutil.rmtree(run)
    (root / "runs" / "_data").mkdir()
    shutil.move(root / "prepared" / "toy-1", root / "runs" / "_data" / "toy-1")
    assert folder_manifest(root).source.class_folders() == ["a", "b"]
    # A class folder that merely holds a config.json stays a class.
    write_good(root / "c" / "0.png", seed=20)
    (root / "c" / "config.json").write_text("{}")
    assert folder_manifest(root).source.class_folders() == ["a", "b", "c"]


def test_a_linked_folder_inside_a_class_folder_is_read(tmp_path):
    """A data engineer's trial (2026-11-30): `ln -s shared_cats cat/more`
    left the four images in it out of the index in silence (rglob does not
    follow linked folders), while a linked class folder was read and the
    flows' cache stamp walked the link. Links are followed, a loop once."""
    root = tmp_path / "photos"
    shared = tmp_path / "shared_cats"
    for i in range(3):
        write_good(root / "cat" / f"{i}.png", seed=i)
        write_good(root / "dog" / f"{i}.png", seed=10 + i)
        write_good(shared / f"x{i}.png", seed=20 + i)
    (root / "cat" / "more").symlink_to(shared)
    (shared / "loop").symlink_to(shared)  # a link back into itself
    write_good(tmp_path / "only" / "0.png", seed=30)
    (root / "bird").mkdir()
    (root / "bird" / "linked").symlink_to(tmp_path / "only")
    manifest = folder_manifest(root, test_fraction=0.0)
    assert manifest.source.class_folders() == ["bird", "cat", "dog"]
    prepared = data.prepare(manifest, tmp_path / "out")
    keys = sorted(r["key"] for r in prepared.read_index().to_pylist())
    assert [k for k in keys if k.startswith("cat/more/")] == [
        "cat/more/x0.png",
        "cat/more/x1.png",
        "cat/more/x2.png",
    ]
    assert "bird/linked/0.png" in keys and len(keys) == 10


def test_split_folders_and_ignored_files(tmp_path):
    root = tmp_path / "src"
    for split, folder in (("train", "tr"), ("test", "val")):
        for c in ("a", "b"):
            for i in range(3):
                write_good(
                    root / folder / c / f"{i}.png",
                    seed=i + (c == "b") * 10 + len(split),
                )
    (root / "tr/a/notes.txt").write_text("not an image, skipped")
    # macOS leaves these beside photos; ._ files carry an image extension.
    (root / "tr/a/._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "tr/b/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "tr/b/.thumbs").mkdir()
    write_good(root / "tr/b/.thumbs/0.png", seed=99)
    manifest = data.Manifest.model_validate(
        {
            "name": "split_folders",
            "description": "d",
            "license": "l",
            "source": {
                "type": "image_folder",
                "root": str(root),
                "split_dirs": {"train": "tr", "test": "val"},
            },
            "image": {"channels": 3},
            "split": {"test_fraction": 0.0, "validation_fraction": 0.0},
        }
    )
    prepared = data.prepare(manifest, tmp_path / "out")
    assert prepared.splits == {"train": 6, "test": 6}
    assert json.load(open(prepared.quarantine_path))["ignored_files"] == [
        "tr/a/._0.png",
        "tr/a/notes.txt",
        "tr/b/.DS_Store",
    ]
    assert prepared.summary()["status"] == {"ok": 12}


def _parquet_manifest(table_path, **source) -> data.Manifest:
    return data.Manifest.model_validate(
        {
            "name": "pq",
            "description": "d",
            "license": "l",
            "source": {"type": "parquet", "path": str(table_path), **source},
            "classes": ["even", "odd"],
            "image": {"channels": 3},
            "split": {"test_fraction": 0.25, "validation_fraction": 0.0},
        }
    )


# (image column, manifest's image_kind): every layout users have, the
# Hugging Face datasets struct<bytes, path> included; "auto" (the default)
# follows the column's Arrow type.
PARQUET_LAYOUTS = {
    "path": ("paths", "path"),
    "bytes": ("bytes", "bytes"),
    "bytes, kind left out": ("bytes", None),
    "paths, kind left out": ("paths", None),
    "hugging face struct": ("struct", None),
}


@pytest.mark.parametrize("layout", sorted(PARQUET_LAYOUTS))
def test_parquet_source(tmp_path, layout):
    column, kind = PARQUET_LAYOUTS[layout]
    paths, blobs, labels = [], [], []
    for i in range(8):
        p = write_good(tmp_path / "img" / f"{i}.png", seed=i)
        paths.append(f"img/{i}.png")
        blobs.append(p.read_bytes())
        labels.append(i % 2)
    paths[3], blobs[3] = "img/missing.png", b"not an image"
    images = {
        "paths": paths,
        "bytes": blobs,
        # As `datasets` writes an Image column: the bytes, and a path that
        # is only a name (unused where bytes are given); row 3 a path only.
        "struct": [
            {"bytes": None if i == 3 else b, "path": p if i == 3 else f"{i}.png"}
            for i, (b, p) in enumerate(zip(blobs, paths))
        ],
    }[column]
    pq.write_table(pa.table({"image": images, "y": labels}), tmp_path / "t.parquet")
    source = {"label_column": "y"} | ({"image_kind": kind} if kind else {})
    prepared = data.prepare(
        _parquet_manifest(tmp_path / "t.parquet", **source), tmp_path / "out"
    )
    rows = prepared.read_index().to_pylist()
    assert rows[3]["status"] == "quarantined"
    assert rows[3]["reason"] == ("not_an_image" if column == "bytes" else "missing")
    assert prepared.class_names == ["even", "odd"]
    assert sum(prepared.splits.values()) == 7
    x, y = next(iter(data.make_dataset(prepared, "train", 8, 2, training=False)))
    assert x.shape == (2, 8, 8, 3) and set(y.numpy()) <= {0, 1}


def test_labels_outside_the_declared_classes_are_named(tmp_path):
    """A trial (2026-11-30): integer labels 7 and -1 beside classes
    [even, odd] failed as "'odd' (no image)", never naming the labels."""
    blobs = [write_good(tmp_path / f"{i}.png", seed=i).read_bytes() for i in range(8)]
    labels = [0, 0, 0, 0, 0, 7, 7, -1]
    pq.write_table(pa.table({"image": blobs, "label": labels}), tmp_path / "t.parquet")
    with pytest.raises(data.PrepareError) as err:
        data.prepare(_parquet_manifest(tmp_path / "t.parquet"), tmp_path / "out")
    assert "'odd' (no image) have no usable example" in str(err.value)
    assert str(err.value).endswith(
        "3 example(s) carry a label that is not in `classes`: '7' (2), '-1' (1); "
        "a label is one of the names or its index 0..1"
    )


def test_integer_labels_without_classes_keep_their_numbers(tmp_path, monkeypatch):
    """A platform trial: integer labels 0..11 and no `classes` gave the
    classes '0', '1', '10', '11', '2', ... (sorted as names), so label 2
    became class 4 and 10 became 2, silently. An integer label is the class
    index it says; the classes are '0' to the largest."""
    blobs, labels = [], []
    for i in range(36):
        blobs.append(encode(pattern(8, 8, 3, i), "PNG"))
        labels.append(i % 12)
    pq.write_table(pa.table({"image": blobs, "label": labels}), tmp_path / "t.parquet")
    manifest = _parquet_manifest(tmp_path / "t.parquet").model_copy(
        update={"classes": None}
    )
    prepared = data.prepare(manifest, tmp_path / "out")
    assert prepared.class_names == [str(i) for i in range(12)]
    rows = prepared.read_index().to_pylist()
    assert all(r["label"] == labels[int(r["key"].split("/")[1])] for r in rows)
    assert all(r["label_name"] == str(r["label"]) for r in rows)
    # String labels (plain and dictionary-encoded, a pandas categorical) stay
    # names, sorted (the first version of this fix compared them with 0).
    names = pa.array(["dog", "cat"] * 18)
    for column in (names, names.dictionary_encode()):
        pq.write_table(
            pa.table({"image": blobs, "label": column}), tmp_path / "s.parquet"
        )
        named = manifest.model_copy(update={"source": manifest.source.model_copy(
            update={"path": str(tmp_path / "s.parquet")})})  # fmt: skip
        assert data.prepare(named, tmp_path / "s").class_names == ["cat", "dog"]
    # An index made before (classes sorted as names) is prepared again, not
    # reused: same files, so only the class order can tell them apart.
    import importlib

    prepare_module = importlib.import_module("thumbnet_keras.data.prepare")
    monkeypatch.setattr(prepare_module, "parquet_index_classes", lambda m: None)
    old = data.prepare(manifest, tmp_path / "old")
    assert old.class_names[:3] == ["0", "1", "10"]
    monkeypatch.undo()
    again = data.prepare(manifest, tmp_path / "old")
    assert not again.reused and again.class_names == [str(i) for i in range(12)]
    # A class index no row has is a class without images: refused, named.
    pq.write_table(
        pa.table({"image": blobs[:4], "label": [0, 0, 2, 2]}), tmp_path / "gap.parquet"
    )
    gap = manifest.model_copy(
        update={"source": manifest.source.model_copy(
            update={"path": str(tmp_path / "gap.parquet")})}
    )  # fmt: skip
    with pytest.raises(data.PrepareError) as err:
        data.prepare(gap, tmp_path / "out_gap")
    assert "'1' (no image)" in str(err.value)
    assert "integer labels are class indices counted from 0" in str(err.value)
    # A negative label (an "unlabelled" -1) is no class: its row is left out.
    pq.write_table(
        pa.table({"image": blobs[:5], "label": [0, 1, 0, 1, -1]}),
        tmp_path / "neg.parquet",
    )
    neg = manifest.model_copy(
        update={"source": manifest.source.model_copy(
            update={"path": str(tmp_path / "neg.parquet")})}
    )  # fmt: skip
    prepared = data.prepare(neg, tmp_path / "out_neg")
    assert prepared.class_names == ["0", "1"]
    assert [r["reason"] for r in prepared.read_index().to_pylist()][-1] == (
        "undeclared_class"
    )


def test_a_run_refuses_data_without_a_test_split(tmp_path):
    """A trial (2026-11-30): a Parquet table whose split column says 'train'
    on every row prepared without a test split (test_fraction unused), and
    the teacher stage then failed with three tracebacks. The run's data step
    now says what is missing and how to fix it."""
    from thumbnet_keras.pipeline import ConfigError
    from thumbnet_keras.pipeline.datasets import prepare_dataset

    blobs = [write_good(tmp_path / f"{i}.png", seed=i).read_bytes() for i in range(12)]
    table = {
        "image": blobs,
        "label": [i % 2 for i in range(12)],
        "split": ["train"] * 12,
    }
    pq.write_table(pa.table(table), tmp_path / "t.parquet")
    manifest = tmp_path / "t.yaml"
    manifest.write_text(
        "name: t\ndescription: d\nlicense: l\nclasses: [a, b]\n"
        "image: {channels: 3}\nsplit: {validation_fraction: 0.2}\n"
        f"source: {{type: parquet, path: {tmp_path / 't.parquet'}, "
        "split_column: split}\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"'t' has no test split \(prepared: train 10, validation 2\).*"
        r"column 'split'.*add rows with split 'test'",
    ):
        prepare_dataset(str(manifest), str(tmp_path / "data"))


def test_an_unused_test_fraction_beside_a_split_column_is_named(tmp_path):
    """A manifest giving split.test_fraction beside a Parquet split_column
    that splits every row: the fraction draws nothing, so preparing warns
    (it was silent); a column with empty rows uses it, without a warning."""
    from thumbnet_keras.data.prepare import prepare

    blobs = [write_good(tmp_path / f"{i}.png", seed=i).read_bytes() for i in range(16)]
    for name, splits, warns in (
        ("every", ["train"] * 12 + ["test"] * 4, True),
        ("some", ["train"] * 4 + [None] * 8 + ["test"] * 4, False),
        # Empty strings are drawn like nulls, as docs/data.md says (a data
        # engineer's trial: they were refused as "not in the splits").
        ("empty", ["train"] * 4 + [""] * 8 + ["test"] * 4, False),
    ):
        table = {"image": blobs, "label": [i % 2 for i in range(16)], "split": splits}
        pq.write_table(pa.table(table), tmp_path / f"{name}.parquet")
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(
            f"name: {name}\ndescription: d\nlicense: l\nclasses: [a, b]\n"
            "image: {channels: 3}\nsplit: {test_fraction: 0.25}\n"
            f"source: {{type: parquet, path: {tmp_path / f'{name}.parquet'}, "
            "split_column: split}\n"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared = prepare(
                str(manifest), tmp_path / f"data_{name}", executor="threads"
            )
        said = [str(w.message) for w in caught if "test_fraction" in str(w.message)]
        if warns:
            assert said == [
                "every: split.test_fraction 0.25 is unused: every row takes its "
                "split from column 'split', so none is drawn for test. Remove "
                "split.test_fraction, or leave the column empty for the rows to "
                "split here."
            ]
        else:
            assert said == []
            assert prepared.splits["test"] == 4 + 2  # the column's 4, 25% of 8


# A table whose columns say something else than the manifest expects: one
# `DataSourceError` naming the column and what to do, before any image is read
# (found by a practitioner's trial, 2026-11-29: these gave tracebacks, a
# silent class "None", or "24 quarantined: empty_file").
PARQUET_REFUSED = {
    "bytes, kind path": (
        {"image": [b"x", b"y"], "label": ["a", "b"]},
        {"image_kind": "path"},
        "column 'image' holds image bytes (binary), but the manifest says "
        "image_kind: path. Set image_kind: bytes",
    ),
    "paths, kind bytes": (
        {"image": ["a.png", "b.png"], "label": ["a", "b"]},
        {"image_kind": "bytes"},
        "holds strings (file paths), but the manifest says image_kind: bytes",
    ),
    "integer images": (
        {"image": [1, 2], "label": ["a", "b"]},
        {},
        "column 'image' is int64; an image column holds encoded image bytes",
    ),
    "null labels": (
        {"image": [b"x", b"y", b"z"], "label": ["a", None, None]},
        {},
        "column 'label' is empty (null) in 2 row(s) (rows 1, 2)",
    ),
    "float labels": (
        {"image": [b"x", b"y"], "label": [1.5, 0.0]},
        {},
        "column 'label' is double; a label is a class name",
    ),
}


def test_parquet_class_messages_speak_of_the_table(tmp_path):
    """An empty table, and a declared class no row has: the advice is about
    the table and `classes`, not about image folders or files."""
    pq.write_table(
        pa.table(
            {"image": pa.array([], pa.binary()), "label": pa.array([], pa.string())}
        ),
        tmp_path / "empty.parquet",
    )
    manifest = _parquet_manifest(tmp_path / "empty.parquet").model_copy(
        update={"classes": None}
    )
    with pytest.raises(data.PrepareError) as err:
        data.prepare(manifest, tmp_path / "out")
    assert str(err.value).endswith(
        "the data has 0 (none). A Parquet table's classes are the values of its "
        "'label' column; this one has no rows."
    )
    good = [encode(pattern(8, 8, 3, i), "PNG") for i in range(8)]
    pq.write_table(
        pa.table({"image": good, "label": ["even"] * 8}), tmp_path / "t.parquet"
    )
    with pytest.raises(data.PrepareError) as err:
        data.prepare(_parquet_manifest(tmp_path / "t.parquet"), tmp_path / "out2")
    assert (
        "declared class(es) 'odd' (no image) have no usable example; add images "
        in str(err.value)
    )
    assert "remove them from `classes`" in str(err.value)


@pytest.mark.parametrize("case", sorted(PARQUET_REFUSED))
def test_parquet_columns_of_the_wrong_kind_are_refused(tmp_path, case):
    columns, source, message = PARQUET_REFUSED[case]
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    manifest = _parquet_manifest(tmp_path / "t.parquet", **source)
    with pytest.raises(data.DataSourceError, match=re.escape(message)):
        data.prepare(manifest, tmp_path / "out")
    assert not (tmp_path / "out" / "index.parquet").exists()


def test_index_is_byte_identical_for_any_number_of_workers(tmp_path):
    import shutil

    make_image_folder(tmp_path / "src")
    manifest = folder_manifest(tmp_path / "src")
    out = tmp_path / "out"
    names = ("index.parquet", "summary.json", "quarantine.json")
    outputs = {}
    for workers in (1, 4):
        shutil.rmtree(out, ignore_errors=True)
        prepared = data.prepare(manifest, out, workers=workers)
        assert prepared.decoded == 20 and not prepared.reused
        outputs[workers] = {n: (out / n).read_bytes() for n in names}
    assert outputs[1] == outputs[4]
    with pytest.raises(ValueError, match="`workers` must be an integer >= 1"):
        data.prepare(manifest, tmp_path / "bad", workers=0)


def test_worker_processes_give_the_same_index_as_one_worker(tmp_path, monkeypatch):
    """Spawned worker processes, small tasks in flight at once: the index,
    report and summary are byte-identical to one worker's, bad files are
    quarantined alike, and so is a re-prepare after a source file changed and
    a converted file was deleted."""
    import importlib
    import shutil

    prepare_module = importlib.import_module("thumbnet_keras.data.prepare")
    monkeypatch.setattr(prepare_module, "_CHUNK", 3)  # 7 tasks for 21 files
    pristine = make_image_folder(tmp_path / "pristine")
    src, out = tmp_path / "src", tmp_path / "out"
    manifest = folder_manifest(src)
    names = ("index.parquet", "summary.json", "quarantine.json")

    def run(workers, executor):
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, src)
        first = data.prepare(manifest, out, workers=workers, executor=executor)
        first_files = {n: (out / n).read_bytes() for n in names}
        (src / "cat/cat_00.png").write_bytes(encode(pattern(24, 24, 3, 7), "PNG"))
        os.remove(first.image_path(rows_by_name(first)["palette.png"]["image_uri"]))
        again = data.prepare(manifest, out, workers=workers, executor=executor)
        again_files = {n: (out / n).read_bytes() for n in names}
        return first.decoded, first_files, again.decoded, again_files

    serial = run(1, "threads")
    in_processes = run(2, "processes")
    # 21 files, one a directory; then the changed file and the lost conversion.
    assert serial[0] == 20 and serial[2] == 2
    assert in_processes == serial
    quarantined = json.loads(in_processes[1]["quarantine.json"])["quarantined"]
    assert {os.path.basename(q["key"]): q["reason"] for q in quarantined} == {
        n: r for n, (s, r) in BAD_FILES.items() if s == "quarantined"
    }


def test_auto_executor_uses_processes_only_for_long_streams(tmp_path, monkeypatch):
    import importlib

    prepare_module = importlib.import_module("thumbnet_keras.data.prepare")
    used = []
    for name in ("_in_threads", "_in_processes"):
        real = getattr(prepare_module, name)

        def spy(*args, real=real, name=name):
            used.append(name)
            return real(*args)

        monkeypatch.setattr(prepare_module, name, spy)
    make_image_folder(tmp_path / "src", with_bad=False)  # 12 candidates
    manifest = folder_manifest(tmp_path / "src")
    for minimum in (13, 12):
        monkeypatch.setattr(prepare_module, "_PROCESS_MIN", minimum)
        data.prepare(manifest, tmp_path / f"out{minimum}", workers=2)
    data.prepare(manifest, tmp_path / "one", workers=1, executor="processes")
    assert used == ["_in_threads", "_in_processes"]
    with pytest.raises(ValueError, match="`executor` must be one of"):
        data.prepare(manifest, tmp_path / "bad", executor="fork")


def test_a_class_too_small_for_a_split_is_named(tmp_path):
    """A class of one image used to get no test and no validation image
    without a word: the run's accuracy then says nothing about it."""
    src = make_image_folder(tmp_path / "src", per_class=8, with_bad=False)
    write_good(src / "rare" / "only.png", seed=999)
    manifest = folder_manifest(src, test_fraction=0.25)
    with pytest.warns(UserWarning) as caught:
        prepared = data.prepare(manifest, tmp_path / "out")
    texts = [str(w.message) for w in caught if "no image in a split" in str(w.message)]
    assert texts == [
        "toy: some classes have no image in a split, so that split measures "
        "nothing of them (test: 'rare' (1 in all)). Add images to those "
        "classes, or merge or drop them."
    ]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["classes_absent_from_split"] == {"test": ["rare"]}
    assert prepared.splits["test"] == 4  # 2 of each 8-image class.
    # Enough images in every class: no warning, nothing recorded.
    (src / "rare" / "only.png").unlink()
    (src / "rare").rmdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.prepare(manifest, tmp_path / "out2")
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["classes_absent_from_split"] == {}


def test_a_class_without_training_images_is_named(tmp_path):
    """A trial: split folders (train/, val/) with a class only in val/ got
    the warning that validation has none of it, not that train has none:
    a teacher trained in the run could never learn it. Both are said, and a
    reused preparation says them again (`data_notices`)."""
    from thumbnet_keras.pipeline.datasets import data_notices

    root = tmp_path / "split"
    for cls, seed in (("a", 0), ("b", 10)):
        for i in range(4):
            write_good(root / "train" / cls / f"{i}.png", seed=seed + i)
            write_good(root / "val" / cls / f"{i}.png", seed=seed + 100 + i)
    write_good(root / "val" / "c" / "0.png", seed=999)
    manifest = data.Manifest.model_validate(
        {
            "name": "folders",
            "description": "d",
            "license": "l",
            "source": {
                "type": "image_folder",
                "root": str(root),
                "split_dirs": {"train": "train", "test": "val"},
            },
            "image": {"channels": 3},
            "split": {"validation_fraction": 0.0},
        }
    )
    with pytest.warns(UserWarning) as caught:
        prepared = data.prepare(manifest, tmp_path / "out")
    texts = [str(w.message) for w in caught if "no image in" in str(w.message)]
    assert texts == [
        "folders: some classes have no image in train, so no model learns them "
        "('c' (1 in all)). Add training images to those classes, or drop them."
    ]
    assert prepared.summary()["classes_absent_from_split"] == {"train": ["c"]}
    assert data_notices(str(tmp_path / "out")) == texts


def test_a_folder_without_images_is_named_not_dropped_silently(tmp_path):
    """An empty class folder (or one of files the extensions skip) is not a
    class; a user who meant it as one used to get a run with a class fewer
    and no word."""
    src = make_image_folder(tmp_path / "src", per_class=8, with_bad=False)
    (src / "empty_class").mkdir()
    (src / "notes").mkdir()
    (src / "notes" / "readme.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="hold no image file") as caught:
        prepared = data.prepare(folder_manifest(src), tmp_path / "out")
    text = next(str(w.message) for w in caught if "hold no image" in str(w.message))
    assert text.startswith("toy: folder(s) 'empty_class', 'notes' under ")
    assert prepared.class_names == ["cat", "dog"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["folders_without_images"] == ["empty_class", "notes"]


def test_source_stamp_follows_every_file_the_source_reads(tmp_path):
    """The flows' prepare cache keys on `source_stamp`: it must change when
    any file the source reads is replaced, the ones a Parquet table names
    (plain, dictionary-encoded, or a Hugging Face struct's path) and those
    in a class folder that is a link included, and only then."""
    from thumbnet_keras.data.sources import source_stamp

    def replace(path):  # Other bytes (and size): what a user's copy does.
        path.write_bytes(path.read_bytes() + b"\0")

    # An image folder whose class folder is a link to a folder elsewhere.
    root = make_image_folder(tmp_path / "src", with_bad=False, per_class=2)
    (root / "cat").rename(tmp_path / "cats_elsewhere")
    (root / "cat").symlink_to(tmp_path / "cats_elsewhere", target_is_directory=True)
    manifest = folder_manifest(root)
    stamp = source_stamp(manifest)
    assert source_stamp(manifest) == stamp
    replace(tmp_path / "cats_elsewhere" / "cat_00.png")
    assert source_stamp(manifest) != stamp

    # Parquet tables naming their files three ways.
    paths = [f"img/{i}.png" for i in range(2)]
    for i in range(2):
        write_good(tmp_path / "img" / f"{i}.png", seed=i)
    columns = {
        "plain": pa.array(paths),
        "dictionary": pa.array(paths).dictionary_encode(),
        "struct": pa.array([{"bytes": None, "path": p} for p in paths]),
    }
    for name, column in columns.items():
        table = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"image": column, "label": ["a", "b"]}), table)
        manifest = _parquet_manifest(table)
        stamp = source_stamp(manifest)
        replace(tmp_path / "img" / "1.png")
        assert source_stamp(manifest) != stamp, name


def test_a_converted_file_is_rewritten_when_its_conversion_changes(tmp_path):
    # converted/<sha>.png is named by the source's bytes; an index made
    # before EXIF orientation was applied left it sideways, and a re-prepare
    # kept it (written only when missing) while the new row said "upright".
    from PIL import ImageOps

    root = make_image_folder(tmp_path / "src", with_bad=False)
    rgba = np.dstack([pattern(12, 20, 3, 1), np.full((12, 20), 255, np.uint8)])
    image = Image.fromarray(rgba)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(root / "cat" / "phone.png", exif=exif)
    out = tmp_path / "out"
    prepared = data.prepare(folder_manifest(root), out)
    row = rows_by_name(prepared)["phone.png"]
    assert (row["reason"], row["orientation"]) == ("drop_opaque_alpha", 1)
    assert (row["width"], row["height"]) == (12, 20)
    converted = prepared.image_path(row["image_uri"])
    upright = np.asarray(
        ImageOps.exif_transpose(Image.open(root / "cat" / "phone.png")).convert("RGB")
    )
    np.testing.assert_array_equal(np.asarray(Image.open(converted)), upright)
    # A stale file from an older conversion, and an index to re-validate.
    Image.fromarray(pattern(12, 20, 3, 1)).save(converted)
    (out / "summary.json").unlink()
    data.prepare(folder_manifest(root), out)
    np.testing.assert_array_equal(np.asarray(Image.open(converted)), upright)


def test_converted_copies_of_removed_or_replaced_images_are_deleted(tmp_path):
    """A data engineer's trial (2026-11-30): converted/ kept the copy of every
    image ever converted, so a source image the user deleted (for privacy,
    say) survived in the prepared folder. A new preparation deletes the
    copies its index no longer names, and only those, and none written
    after it started (another process's)."""
    import os
    import time

    root = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(4):
            write_good(root / c / f"{i}.png", seed=i + 10 * (c == "b"))
    Image.fromarray(pattern(16, 16, 3, 1)).save(root / "a" / "conv.bmp")
    Image.fromarray(pattern(16, 16, 3, 2)).save(root / "b" / "conv.bmp")
    out = tmp_path / "out"
    first = data.prepare(folder_manifest(root), out)
    copies = sorted(p.name for p in (out / "converted").iterdir())
    assert len(copies) == 2
    Image.fromarray(pattern(16, 16, 3, 3)).save(root / "a" / "conv.bmp")  # replaced
    (root / "b" / "conv.bmp").unlink()  # removed
    future = out / "converted" / "f.png"  # as if another process wrote it now
    future.write_bytes(b"x")
    os.utime(future, (time.time() + 60, time.time() + 60))
    again = data.prepare(folder_manifest(root), out)
    named = {r["image_uri"] for r in again.read_index().to_pylist() if r["image_uri"]}
    left = {f"converted/{p.name}" for p in (out / "converted").iterdir()}
    assert left - named == {"converted/f.png"}
    assert not set(copies) & {p.name for p in (out / "converted").iterdir()}
    assert first.out_dir == again.out_dir


def test_tfds_rows_keep_the_stored_orientation(tmp_path):
    # The TFDS stream applies no EXIF orientation, so its rows must not
    # claim one (nor the upright sizes).
    from thumbnet_keras.data.prepare import _process
    from thumbnet_keras.data.sources import Candidate
    from thumbnet_keras.data.validate import Validation

    cand = Candidate(key="train/7", label_name="a", source_split="train",
                     data=b"x", tfds_index=7, tfds_split="train")  # fmt: skip
    tagged = Validation(status="ok", width=12, height=20, channels=3, orientation=6)
    row, _ = _process(cand, (b"x", "ab" * 32, tagged, True), {}, tmp_path, True)
    assert (row["orientation"], row["width"], row["height"]) == (1, 20, 12)
    row, _ = _process(cand, (b"x", "ab" * 32, tagged, True), {}, tmp_path, False)
    assert (row["orientation"], row["width"], row["height"]) == (6, 12, 20)


_ORPHAN_PARENT = """
import itertools, multiprocessing, sys, time
from thumbnet_keras.data.prepare import _examined
from thumbnet_keras.data.sources import Candidate

if __name__ == "__main__":
    png = open(sys.argv[1], "rb").read()
    endless = (Candidate(key=str(i), label_name="a", source_split=None, data=png)
               for i in itertools.count())
    examined = _examined(endless, [], workers=2, executor="processes")
    next(examined)  # the pool is up and working
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    time.sleep(120)
"""


def test_prepare_workers_exit_when_the_parent_is_killed(tmp_path):
    """A trial (2026-11-30): `kill -9` of a preparing process left its
    worker processes running, idle. Workers of prepare's own process pool
    now watch their parent."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_PARENT)
    png = write_good(tmp_path / "a.png", seed=0)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(png)], stdout=subprocess.PIPE, text=True
    )
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers and proc.pid not in workers

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    assert all(alive(p) for p in workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "prepare's workers outlived their parent"


def test_changed_files_names_what_changed_since_prepare(tmp_path):
    """`thumbnet evaluate` reads the files in place: a test image edited,
    removed or made unreadable since prepare scored without a word (or gave
    TensorFlow's decode traceback). `changed_files` finds each, for the
    splits asked only; converted copies (the folder's own) count as there."""
    make_image_folder(tmp_path / "src")  # 12 good, 3 converted, bad ones
    prepared = data.prepare(folder_manifest(tmp_path / "src"), tmp_path / "out")
    assert prepared.changed_files(("train", "validation", "test")) == []
    rows = [r for r in prepared.read_index().to_pylist() if r["status"] == "ok"]
    test = [r["image_uri"] for r in rows if r["split"] == "test"]
    train = [r["image_uri"] for r in rows if r["split"] == "train"]
    assert len(test) >= 3 and train
    edited, removed, unreadable = test[:3]
    write_good(Path(edited), seed=99)  # same name, other pixels
    os.remove(removed)
    os.remove(unreadable)
    os.mkdir(unreadable)  # read fails even as root (chmod would not)
    os.remove(train[0])
    found = dict(prepared.changed_files(("test",)))
    assert found.pop(edited) == "content changed"
    assert found.pop(removed) == "missing"
    assert found.pop(unreadable).startswith("unreadable: ")
    assert found == {}
    assert [p for p, _ in prepared.changed_files(("train",))] == [train[0]]


def _flip_iend_crc_bit(png: bytes) -> bytes:
    blob = bytearray(png)
    blob[png.index(b"IEND") - 5] ^= 1  # IDAT's CRC, just before IEND's chunk
    return bytes(blob)


def _with_text_chunk(png: bytes, crc_ok: bool) -> bytes:
    """`png` with a tEXt chunk after IDAT (an ancillary chunk), its CRC
    right or wrong."""
    import struct
    import zlib

    body = b"tEXt" + b"Comment\x00hello"
    crc = zlib.crc32(body) ^ (0 if crc_ok else 1)
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", crc)
    at = png.index(b"IEND") - 4
    return png[:at] + chunk + png[at:]


def test_an_ancillary_chunks_bad_crc_is_no_reason_to_quarantine():
    """libpng (TensorFlow's decoder) only warns about an ancillary chunk's
    bad CRC and decodes the image (a review): it stays `ok` here too."""
    import tensorflow as tf

    png = encode(pattern(16, 16, 3, 2), "PNG")
    for crc_ok in (True, False):
        blob = _with_text_chunk(png, crc_ok)
        assert tf.io.decode_image(blob, channels=3).shape == (16, 16, 3)
        assert validate_bytes(blob).status == "ok", crc_ok


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_flip_iend_crc_bit, "corrupt"),
        (lambda png: png[:-2], "truncated"),  # cut inside IEND's CRC
        (lambda png: png[:-4], "truncated"),  # IEND without its CRC
    ],
)
def test_png_damage_pillow_reads_but_tensorflow_refuses_is_quarantined(damage, reason):
    """A trial (2026-12-01): a PNG with one flipped CRC bit, or cut inside
    its IEND chunk, decoded in Pillow, was indexed `ok`, then failed
    training in TensorFlow's decoder with a traceback naming no file."""
    import tensorflow as tf

    png = encode(pattern(16, 16, 3, 2), "PNG")
    bad = damage(png)
    Image.open(io.BytesIO(bad)).load()  # Pillow reads it...
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(bad, channels=3, expand_animations=False)  # ...TF not
    assert validate_bytes(png).status == "ok"
    v = validate_bytes(bad)
    assert (v.status, v.reason) == ("quarantined", reason)


def test_an_index_validated_under_older_rules_is_validated_again(tmp_path, monkeypatch):
    """Rows are reused by (key, sha256) across prepares; an index written
    before PNG CRCs were checked (validation rules 1) kept a damaged PNG
    `ok` for as long as its bytes stayed. An index of other rules is
    re-validated, and, if nothing changed, marked with today's rules."""
    import importlib

    from thumbnet_keras.data import validate

    prepare_module = importlib.import_module("thumbnet_keras.data.prepare")
    make_image_folder(tmp_path / "src", with_bad=False)
    manifest = folder_manifest(tmp_path / "src")
    out = tmp_path / "out"
    png = next((tmp_path / "src").rglob("*.png"))
    png.write_bytes(_flip_iend_crc_bit(png.read_bytes()))

    def old_rules_index():
        with monkeypatch.context() as patch:  # as the rules before CRCs were
            patch.setattr(validate, "_png_problem", lambda data: None)
            patch.setattr(prepare_module, "RULES_VERSION", RULES_VERSION - 1)
            patch.setattr(validate, "RULES_VERSION", RULES_VERSION - 1)
            old = data.prepare(manifest, out, workers=1)
        assert rows_by_name(old)[png.name]["status"] == "ok"
        assert old.summary()["validation_rules"] == RULES_VERSION - 1
        return old

    old_rules_index()
    redone = data.prepare(manifest, out, workers=1)
    assert not redone.reused
    assert rows_by_name(redone)[png.name]["reason"] == "corrupt"
    assert redone.summary()["validation_rules"] == RULES_VERSION

    # The same verdicts under both rules: the index is kept, marked with
    # today's rules, and the next prepare reuses its rows again.
    (out / "summary.json").unlink()
    png.unlink()
    first = data.prepare(manifest, out, workers=1)
    summary = json.loads((out / "summary.json").read_text())
    summary["validation_rules"] = RULES_VERSION - 1
    index_module.write_json(out / "summary.json", summary)
    again = data.prepare(manifest, out, workers=1)
    assert again.reused and again.decoded == 0
    assert again.summary()["validation_rules"] == RULES_VERSION
    assert again.splits == first.splits


def test_16_bit_gray_and_colour_keep_the_same_byte():
    """A practitioner's trial (2026-12-01): 16-bit gray took round(v / 257)
    (511 -> 2) while 16-bit RGB took Pillow's high byte (511 -> 1), as does
    tf.image.convert_image_dtype: one level apart for one value. Both keep
    the high byte now."""
    import io
    import struct
    import zlib

    from thumbnet_keras.data.validate import validate_bytes

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    def png16(planes: int) -> bytes:  # Pillow writes no 16-bit RGB PNG
        header = struct.pack(">IIBBBBB", 4, 4, 16, 0 if planes == 1 else 2, 0, 0, 0)
        row = b"\0" + struct.pack(f">{4 * planes}H", *[511] * (4 * planes))
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(row * 4)) + chunk(b"IEND", b"")
        )  # fmt: skip

    for planes in (1, 3):
        result = validate_bytes(png16(planes))
        assert (result.status, result.reason) == ("converted", "16bit_to_8bit")
        pixels = np.asarray(Image.open(io.BytesIO(result.converted)))
        assert (pixels == 1).all(), (planes, np.unique(pixels))
