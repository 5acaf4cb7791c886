import csv
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from pretune.data.arrays import (
    ArrayDataConfig,
    ArrayDataset,
    build_array_data,
    channel_stats,
    load_image_files,
    modality,
)
from pretune.data.images import load_digits
from pretune.errors import DataError, RecipeError
from pretune.recipe import validate


def build(label_names=None, seed=0, **cfg):
    return build_array_data(ArrayDataConfig(**cfg), seed, label_names)


def write_image(path, value=0, size=(6, 6), mode="L", noise=False):
    """A small image whose pixels are ``value`` (so tests can tell images apart), or noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3}[mode]
    shape = (size[1], size[0]) + ((channels,) if channels > 1 else ())
    pixels = np.random.default_rng(value).integers(0, 256, shape) if noise else np.full(shape, value)
    Image.fromarray(pixels.astype(np.uint8), mode).save(path)
    return path


def image_folder(root, counts, size=(6, 6), mode="L"):
    """``root/<class>/<i>.png`` with pixel value 10 * class index + i."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"{i:02d}.png", 10 * c + i, size, mode)
    return str(root)


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def ids(dataset):
    """The first feature of vector tests holds the row number: which rows a split holds."""
    return set(dataset.x[:, 0].long().tolist())


def id_vectors(tmp_path, per_class=(30, 20, 10)):
    rows = [(i, i % 7, f"c{c}") for c, n in enumerate(per_class) for i in range(n)]
    rows = [(i, f, y) for i, (_, f, y) in enumerate(rows)]
    return write_csv(tmp_path / "ids.csv", ["id", "f", "label"], rows)


# ---------------------------------------------------------------- config


def test_modality():
    assert modality({"images": "photos/"}) == "image"
    assert modality({"vectors": "x.csv"}) == modality({"file": "x.npy"}) == "vector"
    assert modality({"files": ["corpus.txt"]}) == modality({}) == "text"
    assert modality({"images": None, "vectors": "x.csv"}) == "vector"


def test_config_defaults_alias_and_round_trip():
    assert ArrayDataConfig().images == "builtin:digits"
    cfg = ArrayDataConfig.model_validate({"file": "x.csv", "classes": [5, 6], "budget": 10})
    assert cfg.vectors == "x.csv" and cfg.images is None and cfg.classes == ["5", "6"]
    assert ArrayDataConfig(vectors="x.csv").vectors == "x.csv"
    for cfg in (cfg, ArrayDataConfig(size=16, channels=3)):
        assert ArrayDataConfig.model_validate(cfg.model_dump()) == cfg
        assert ArrayDataConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(RecipeError, match="set one of data.images, data.audio or data.vectors"):
        validate(ArrayDataConfig, {"images": "a", "vectors": "b.csv"}, prefix="data.")
    with pytest.raises(RecipeError, match="data.budget"):
        validate(ArrayDataConfig, {"budget": 0}, prefix="data.")
    with pytest.raises(RecipeError, match="data.channels"):
        validate(ArrayDataConfig, {"channels": 2}, prefix="data.")


# ---------------------------------------------------------------- image folders


def test_labelled_folder_sorted_classes_and_labels(tmp_path):
    root = image_folder(tmp_path / "imgs", {"2": 4, "10": 4, "1": 4})
    data = build(images=root, validation_fraction=0.25)
    assert data.modality == "image" and data.shape == (1, 6, 6) and data.label_names == ["1", "2", "10"]
    assert len(data.train) == 9 and len(data.validation) == 3 and data.skipped == []
    for split in (data.train, data.validation):
        assert split.x.dtype == torch.float32 and split.labels.dtype == torch.long
        assert 0 <= split.x.min() and split.x.max() <= 1
        # pixel value 10 * (position in the dict: 2, 10, 1) + i tells the folder each image came from
        folder = (split.x[:, 0, 0, 0] * 255).round().long() // 10
        assert [data.label_names[y] for y in split.labels] == [["2", "10", "1"][f] for f in folder]
    assert sorted(Counter(data.validation.labels.tolist()).values()) == [1, 1, 1]  # stratified
    batch = data.train[[0, 2]]
    assert set(batch) == {"x", "labels"} and batch["x"].shape == (2, 1, 6, 6)


def test_unlabelled_folder(tmp_path):
    for i in range(5):
        write_image(tmp_path / f"{i}.PNG", i)
    (tmp_path / "notes.txt").write_text("not an image")
    data = build(images=str(tmp_path))
    assert data.label_names is None and data.train.labels is None and data.validation.labels is None
    assert len(data.train) + len(data.validation) == 5
    assert set(data.train[[0, 1]]) == {"x"}
    with pytest.raises(DataError, match="budget needs labelled data"):
        build(images=str(tmp_path), budget=2)
    with pytest.raises(DataError, match="classes needs labelled data"):
        build(images=str(tmp_path), classes=["a"])


def test_resize_and_channels(tmp_path):
    gray = image_folder(tmp_path / "gray", {"a": 2, "b": 2}, size=(10, 6))
    assert build(images=gray).shape == (1, 6, 10)
    assert build(images=gray, size=4).shape == (1, 4, 4)
    assert build(images=gray, channels=3).shape == (3, 6, 10)
    write_image(tmp_path / "gray" / "a" / "rgb.png", 200, (10, 6), "RGB")
    data = build(images=gray, validation_fraction=0)
    assert data.shape == (3, 6, 10) and data.validation is None  # auto: one colour image makes all RGB
    assert torch.equal(data.train.x[:, 0], data.train.x[:, 1])  # gray images repeated over channels
    assert build(images=gray, channels=1).shape == (1, 6, 10)
    write_image(tmp_path / "gray" / "b" / "big.png", 5, (12, 12))
    with pytest.raises(DataError, match=r"big\.png is 12x12 but .*a/00\.png is 10x6; set data\.size"):
        build(images=gray)
    assert build(images=gray, size=5).shape == (3, 5, 5)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    x, kept, skipped = load_image_files([tmp_path / "deep.png"], None, "auto")
    assert x.shape == (1, 1, 1, 3) and kept == [0] and skipped == []
    assert x.flatten().tolist() == pytest.approx([0.0, 128 / 255, 1.0])


def broken_images(root):
    """A labelled folder with a text file named .jpg and PNG / JPEG files cut in half."""
    image_folder(root, {"a": 3, "b": 3})
    (root / "a" / "text.jpg").write_text("this is not a JPEG")
    for name in ("cut.png", "cut.jpg"):
        data = write_image(root / "b" / name, 7, (32, 32), noise=True).read_bytes()
        (root / "b" / name).write_bytes(data[: len(data) // 2])
    return str(root)


def test_corrupted_and_truncated_images_are_skipped_and_named(tmp_path, capsys, monkeypatch):
    root = broken_images(tmp_path / "imgs")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # set by some other library: still refused
    data = build(images=root)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    assert len(data.train) + len(data.validation) == 6
    assert sorted(s.split(" (")[0].rsplit("/", 2)[-1] for s in data.skipped) == ["cut.jpg", "cut.png", "text.jpg"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 3 unreadable image file(s)" in err[0] and "cut.jpg" in err[0]


@pytest.mark.parametrize("name", ["text.jpg", "cut.png", "cut.jpg"])
def test_bad_image_error_policy_names_the_file(tmp_path, name):
    root = tmp_path / "imgs"
    image_folder(root, {"a": 2})
    broken_images(tmp_path / "all")
    source = next((tmp_path / "all").rglob(name))
    (root / "a" / name).write_bytes(source.read_bytes())
    with pytest.raises(DataError, match=rf"cannot decode image .*{name}") as info:
        build(images=str(root), bad_files="error")
    assert "\n" not in str(info.value)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build(images=str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        build(images=str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    write_image(mixed / "loose.png")
    write_image(mixed / "cls" / "0.png")
    with pytest.raises(DataError, match="both image files"):
        build(images=str(mixed))
    with pytest.raises(DataError, match="is a file"):
        build(images=str(mixed / "loose.png"))
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 image files could be decoded"):
        build(images=str(broken))


# ---------------------------------------------------------------- builtin digits


def test_builtin_digits():
    x, keys = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and len(keys) == 1797
    assert x.min() == 0 and x.max() == 1
    assert x[0, 0, 0].tolist() == [0, 0, 5 / 16, 13 / 16, 9 / 16, 1 / 16, 0, 0] and keys[0] == "0"
    counts = Counter(keys)
    assert sorted(counts) == [str(d) for d in range(10)] and min(counts.values()) >= 174 and max(counts.values()) <= 183

    data = build()  # image recipes read the digits at 16x16 unless data.size says otherwise
    assert data.modality == "image" and data.shape == (1, 16, 16) and data.label_names == [str(d) for d in range(10)]
    raw = build(size=8, validation_fraction=0)
    assert raw.shape == (1, 8, 8) and torch.equal(raw.train.x, x)
    assert len(data.train) + len(data.validation) == 1797 and len(data.validation) == round(0.2 * 1797)
    per_class = Counter(data.validation.labels.tolist())
    assert all(abs(per_class[k] - 0.2 * counts[str(k)]) <= 1 for k in range(10))
    big = build(size=16, channels=3, validation_fraction=0)
    assert big.shape == (3, 16, 16) and 0 <= big.train.x.min() and big.train.x.max() <= 1


def test_images_keep_their_own_size_unless_data_size_says_otherwise(tmp_path, capsys):
    """28x28 photos used to train at 16x16 silently (the recipes set data.size: 16)."""
    from pretune.recipe import load_recipe
    from pretune.studies.compare import load_study

    photos = image_folder(tmp_path / "photos", {"a": 3, "b": 3}, size=(28, 28))
    recipes = {"image-simclr": load_recipe("recipes/image-simclr.yaml", [f"data.images={photos}"]).data,
               "study-images": load_study("recipes/study-images.yaml", [f"data.images={photos}"])[2].data}
    for name, data_cfg in recipes.items():
        assert build(**data_cfg).shape == (1, 28, 28), name
        assert build(**{**data_cfg, "images": "builtin:digits"}).shape == (1, 16, 16), name  # the demo's digits
    assert capsys.readouterr().err == ""
    assert build(images=photos, size=16).shape == (1, 16, 16)
    note = capsys.readouterr().err.strip().splitlines()
    assert note == [f"pretune: note: the images of {photos} are 28x28; they are resized to 16x16 because data.size=16 "
                    "(unset data.size to keep their own size)"]
    assert build(images=photos, size=28).shape == (1, 28, 28) and capsys.readouterr().err == ""  # nothing changes: nothing said
    write_image(tmp_path / "photos" / "b" / "wide.png", 1, (40, 30))
    build(images=photos, size=16)
    assert "have 2 sizes (28x28, 40x30)" in capsys.readouterr().err


# ---------------------------------------------------------------- splits, budget, classes


def test_split_is_deterministic_disjoint_and_ignores_run_seed(tmp_path):
    path = id_vectors(tmp_path)
    first, again, other_run = build(vectors=path), build(vectors=path), build(vectors=path, seed=123)
    assert ids(first.train).isdisjoint(ids(first.validation))
    assert ids(first.train) | ids(first.validation) == set(range(60))
    for data in (again, other_run):
        assert torch.equal(data.validation.x, first.validation.x) and torch.equal(data.train.x, first.train.x)
    assert Counter(first.validation.labels.tolist()) == {0: 6, 1: 4, 2: 2}
    assert ids(build(vectors=path, split_seed=1).validation) != ids(first.validation)


def test_split_does_not_move_with_classes_or_max_examples(tmp_path):
    path = id_vectors(tmp_path)
    full = build(vectors=path)
    some = build(vectors=path, classes=["c2", "c0"])
    assert some.label_names == ["c0", "c2"] and sorted(set(some.train.labels.tolist())) == [0, 1]
    assert ids(some.validation) <= ids(full.validation) and ids(some.train) <= ids(full.train)
    capped = build(vectors=path, max_examples=20)
    assert len(capped.train) + len(capped.validation) == 20
    assert ids(capped.validation) <= ids(full.validation) and ids(capped.train) <= ids(full.train)
    assert torch.equal(build(vectors=path, max_examples=20).train.x, capped.train.x)


def test_budget_per_class_nested_and_validation_unchanged(tmp_path):
    path = id_vectors(tmp_path)
    full = build(vectors=path)
    two, four, half = (build(vectors=path, budget=b) for b in (2, 4, 0.5))
    assert Counter(two.train.labels.tolist()) == {0: 2, 1: 2, 2: 2}
    assert Counter(half.train.labels.tolist()) == {0: 12, 1: 8, 2: 4}
    assert ids(two.train) < ids(four.train) < ids(full.train)
    for data in (two, four, half):
        assert torch.equal(data.validation.x, full.validation.x)
        assert torch.equal(data.unlabelled_train.x, full.train.x)
    assert ids(build(vectors=path, budget=2, budget_seed=1).train) != ids(two.train)


def test_classes_filter_and_unknown_class():
    data = build(classes=[5, 6, 7, 8, 9])
    assert data.label_names == ["5", "6", "7", "8", "9"]
    assert sorted(set(data.train.labels.tolist())) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"'11' is not a class of builtin:digits; its classes are: 0, 1, 2"):
        build(classes=["1", "11"])


def test_label_names_fix_the_order_and_test_split(tmp_path):
    root = image_folder(tmp_path / "train", {"cat": 4, "dog": 4})
    test = image_folder(tmp_path / "test", {"dog": 2})
    data = build(images=root, test=test, label_names=["dog", "cat"])
    assert data.label_names == ["dog", "cat"]
    assert data.test.labels.tolist() == [0, 0] and data.test.x.shape == (2, 1, 6, 6)
    cat = data.train.labels == 1  # cat images have pixel values 0..3, dog images 10..13
    assert ((data.train.x[cat] * 255).round() < 10).all() and ((data.train.x[~cat] * 255).round() >= 10).all()
    with pytest.raises(DataError, match=r"class 'cat' of .*train is not in the label map \(dog, bird\)"):
        build(images=root, label_names=["dog", "bird"])
    image_folder(tmp_path / "test", {"dog": 1, "bird": 1})
    with pytest.raises(DataError, match=r"class 'bird' of .*test never appears in .*train"):
        build(images=root, test=test)
    write_image(tmp_path / "odd" / "cat" / "0.png", 1, (7, 7))
    with pytest.raises(DataError, match=r"shape \(1, 7, 7\) .* have \(1, 6, 6\); set data.size"):
        build(images=root, test=str(tmp_path / "odd"))
    assert build(images=root, test=str(tmp_path / "odd"), size=5).test.x.shape == (1, 1, 5, 5)


def test_builtin_digits_with_a_test_folder_of_rgb_images(tmp_path):
    test = image_folder(tmp_path / "test", {"3": 2}, size=(8, 8), mode="RGB")
    data = build(test=test, size=8)
    assert data.test.x.shape == (2, 1, 8, 8) and data.test.labels.tolist() == [3, 3]
    with pytest.raises(DataError, match=r"have shape \(1, 8, 8\) but those of builtin:digits have \(1, 16, 16\); set data.size"):
        build(test=test)  # the digits are read at 16x16 unless data.size says otherwise


# ---------------------------------------------------------------- vector files

X = np.array([[0.5, 1.0, -2.0], [1.5, 0.0, 3.0], [2.5, 4.0, 1.0], [3.5, 2.0, 0.0]], dtype=np.float32)
Y = ["b", "a", "b", "a"]


def test_vector_formats_read_the_same(tmp_path):
    rows = [list(map(float, r)) + [y] for r, y in zip(X, Y)]
    paths = [write_csv(tmp_path / "v.csv", ["f1", "f2", "f3", "label"], rows),
             write_csv(tmp_path / "v.tsv", ["label", "f1", "f2", "f3"], [[r[-1]] + r[:-1] for r in rows], "\t"),
             str(tmp_path / "v.parquet"), str(tmp_path / "v.npz")]
    pq.write_table(pa.table({"f1": X[:, 0], "f2": X[:, 1].astype(np.int64), "f3": X[:, 2], "label": Y}), paths[2])
    np.savez(paths[3], x=X, y=np.array(Y))
    for path in paths:
        data = build(vectors=path, validation_fraction=0)
        assert data.modality == "vector" and data.shape == (3,) and data.label_names == ["a", "b"], path
        assert torch.equal(data.train.x, torch.from_numpy(X)), path
        assert data.train.labels.tolist() == [1, 0, 1, 0], path
        assert set(data.train[[0]]) == {"x", "labels"}

    np.save(tmp_path / "v.npy", X.astype(np.float64))
    np.savez(tmp_path / "nolabel.npz", x=X)
    write_csv(tmp_path / "nolabel.csv", ["f1", "f2", "f3"], X.tolist())
    for name in ("v.npy", "nolabel.npz", "nolabel.csv"):
        data = build(file=str(tmp_path / name), validation_fraction=0)
        assert data.label_names is None and data.train.labels is None and torch.equal(data.train.x, torch.from_numpy(X))
    with pytest.raises(DataError, match=r"line 2 of \S+v\.csv column 'label': 'b' is not a finite \(float32\) number"):
        build(vectors=paths[0], label=None)  # label=None: every column is a feature


def test_numeric_labels_sort_as_numbers(tmp_path):
    path = write_csv(tmp_path / "v.csv", ["x", "label"], [[i, [10, 9, 2][i % 3]] for i in range(9)])
    assert build(vectors=path).label_names == ["2", "9", "10"]
    np.savez(tmp_path / "v.npz", x=X, y=np.array([1.0, 0.0, 1.0, 0.0]))
    assert build(vectors=str(tmp_path / "v.npz")).label_names == ["0", "1"]


def _csv(tmp_path, text):
    (tmp_path / "d.csv").write_text(text, encoding="utf-8")
    return str(tmp_path / "d.csv")


def _npy(tmp_path, array, name="d.npy"):
    np.save(tmp_path / name, array)
    return str(tmp_path / name)


def _npz(tmp_path, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return str(tmp_path / "d.npz")


def _parquet(tmp_path, columns):
    pq.write_table(pa.table(columns), tmp_path / "d.parquet")
    return str(tmp_path / "d.parquet")


def _bytes(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


VECTOR_ERRORS = {  # case: (make the file, the error; "@" stands for the file's path)
    "non-numeric cell": (lambda t: _csv(t, "a,b,label\n1,2,x\n3,abc,y\n"), r"line 3 of @ column 'b': 'abc' is not"),
    "NaN cell": (lambda t: _csv(t, "a,b,label\n1,2,x\n\n3,nan,y\n"), r"line 4 of @ column 'b': 'nan' is not a fin"),
    "inf cell": (lambda t: _csv(t, "a,b\n1,2\n-inf,3\n"), r"line 3 of @ column 'a': '-inf'"),
    "huge cell": (lambda t: _csv(t, "a,b\n1,2\n3,1e39\n"), r"line 3 of @ column 'b': '1e39' is not a finite \(fl"),
    "empty cell": (lambda t: _csv(t, "a,b\n1,\n"), r"line 2 of @ column 'b': '' is not"),
    "ragged row": (lambda t: _csv(t, "a,b,label\n1,2,x\n3,4\n"), r"line 3 of @ has 2 fields but the header has 3"),
    "missing label": (lambda t: _csv(t, "a,label\n1,x\n2,\n"), r"missing label in line 3 of @ column 'label'"),
    "missing file": (lambda t: str(t / "nope.csv"), r"'@' does not exist"),
    "empty file": (lambda t: _csv(t, ""), r"@ is empty"),
    "header only": (lambda t: _csv(t, "a,b\n"), r"@ has no rows"),
    "label only": (lambda t: _csv(t, "label\nx\n"), r"@ has no feature columns"),
    "not UTF-8": (lambda t: _bytes(t, "d.csv", b"a,b\n1,\xe9\n"), r"@ is not valid UTF-8 \(line 2"),
    "unsupported": (lambda t: _bytes(t, "d.txt", b"1"), r"@: unsupported vector file"),
    "a folder": (lambda t: str(t), r"@: unsupported vector file; use .* \(or data\.images for a folder\)"),
    "1-D npy": (lambda t: _npy(t, np.arange(5.0)), r"@: the array has shape \(5,\); vectors need a 2-D array"),
    "3-D npy": (lambda t: _npy(t, np.zeros((2, 3, 3))), r"@: the array has shape \(2, 3, 3\)"),
    "NaN in npy": (lambda t: _npy(t, np.array([[1.0, 2, 3], [4, 5, np.nan]])), r"row 2 of @ column 3 is nan"),
    "huge in npy": (lambda t: _npy(t, np.array([[1e300]])), r"row 1 of @ column 1 is 1e\+300"),
    "strings in npy": (lambda t: _npy(t, np.array([["a", "b"]])), r"@: the array holds <U1 values"),
    "pickled npy": (lambda t: _npy(t, np.array([[{}, 1]], dtype=object)), r"@: cannot read \.npy file"),
    "not an npy": (lambda t: _bytes(t, "d.npy", b"hello"), r"@: cannot read \.npy file"),
    "npz without x": (lambda t: _npz(t, data=X), r"@ has no array 'x' \(its arrays: data\)"),
    "npz short y": (lambda t: _npz(t, x=X, y=np.arange(3)), r"@: array 'y' has shape \(3,\); expected .* \(4,\)"),
    "npz NaN label": (lambda t: _npz(t, x=X, y=np.array([0, 1, np.nan, 1])), r"missing label in row 3 of @ array 'y'"),
    "parquet strings": (lambda t: _parquet(t, {"a": [1.0, 2.0], "b": ["1", "x"]}), r"row 1 of @ column 'b' holds '1'"),
    "parquet null": (lambda t: _parquet(t, {"a": pa.array([1, None], pa.int64())}), r"row 2 of @ column 'a' is miss"),
    "parquet inf": (lambda t: _parquet(t, {"a": [1.0, 2.0], "b": [0.0, -np.inf]}), r"row 2 of @ column 'b' is -inf"),
    "parquet null label": (lambda t: _parquet(t, {"a": [1, 2], "label": ["x", None]}), r"missing label in row 2 of @"),
    "not parquet": (lambda t: _bytes(t, "d.parquet", b"hello"), r"@: cannot read Parquet file"),
}


@pytest.mark.parametrize("case", list(VECTOR_ERRORS))
def test_vector_errors_name_file_row_and_column(tmp_path, case):
    make, pattern = VECTOR_ERRORS[case]
    path = make(tmp_path)
    with pytest.raises(DataError, match=pattern.replace("@", re.escape(path))) as info:
        build(vectors=path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- tensors


def test_channel_stats():
    x = torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])[:, None].repeat(1, 3, 1, 1)  # [2, 3, 2, 2]
    x[:, 2] = 0.25
    mean, std = channel_stats(x)
    assert mean.tolist() == pytest.approx([0.5, 0.5, 0.25]) and std.tolist() == pytest.approx([0.5, 0.5, 1e-6])
    vectors = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    mean, std = channel_stats(vectors)
    assert mean.tolist() == [2.0, 10.0] and std.tolist() == pytest.approx([1.0, 1e-6])
    assert mean.dtype == std.dtype == torch.float32


def test_array_dataset_indexing():
    dataset = ArrayDataset(torch.arange(12.0).reshape(4, 3), torch.tensor([0, 1, 0, 1]))
    batch = dataset[[3, 1]]
    assert len(dataset) == 4 and batch["x"][:, 0].tolist() == [9.0, 3.0] and batch["labels"].tolist() == [1, 1]
    assert set(ArrayDataset(dataset.x, None)[[0]]) == {"x"}
