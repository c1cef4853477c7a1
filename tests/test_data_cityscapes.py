"""Cityscapes domain-incremental data: reader, label mapping, steps, split modes, errors, synthetic domains.

Expected values come from the spec (plop-spec.md §13.1-13.5); the trees are tiny generated ones.
"""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from segmentation.data import DatasetError
from segmentation.data.cityscapes import (
    build_domain_dataset,
    cityscapes_folder,
    domain_split_indices,
    read_cityscapes_list,
    train_id_lut,
)
from segmentation.data.synthetic import MARKER
from segmentation.data.synthetic_domain import (
    STUFF,
    appearance_colour,
    class_colour,
    domain_style,
    generate_synthetic_domain,
    synthetic_domain_item,
)
from segmentation.domain_tasks import CITIES, CITY_NAMES, DOMAIN_TASKS

# §13.3: train id of each label id; every other id is ignored (255).
SPEC_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# §13.2: the standard gtFine image count of each city.
GTFINE_COUNTS = {
    "aachen": 174, "bremen": 316, "darmstadt": 85, "erfurt": 109, "hanover": 196, "krefeld": 99,
    "strasbourg": 365, "tubingen": 144, "weimar": 142, "bochum": 96, "cologne": 154, "dusseldorf": 221,
    "hamburg": 248, "jena": 119, "monchengladbach": 94, "stuttgart": 196, "ulm": 95, "zurich": 122,
    "frankfurt": 267, "lindau": 59, "munster": 174,
}

# §13.5, plop mode: (train, val, test) sizes of every step.
PLOP_SIZES = {
    "11-5": ([1504, 702, 573], [376, 176, 144], [376, 552, 695]),
    "11-1": (
        [1504, 176, 198, 95, 75, 156, 76, 97, 213, 47, 139],
        [376, 45, 50, 24, 19, 40, 19, 25, 54, 12, 35],
        [376, 421, 470, 494, 513, 552, 571, 595, 649, 661, 695],
    ),
    "1-1": (
        [139, 252, 68, 87, 156, 79, 292, 115, 113, 76, 123, 176, 198, 95, 75, 156, 76, 97, 213, 47, 139],
        [35, 64, 17, 22, 40, 20, 73, 29, 29, 20, 31, 45, 50, 24, 19, 40, 19, 25, 54, 12, 35],
        [35, 98, 115, 137, 176, 196, 269, 298, 326, 346, 376, 421, 470, 494, 513, 552, 571, 595, 649, 661, 695],
    ),
}

IMAGES_PER_CITY = 5


def _standard_domains() -> np.ndarray:
    """Domain ids of the 3,475 standard gtFine images in read order (§13.1): the official-train cities
    alphabetically, then the official-val cities alphabetically, each repeated by its count."""
    domains = []
    for split in ("train", "val"):
        for city in sorted(city for city, city_split in CITIES if city_split == split):
            domains += [CITY_NAMES.index(city)] * GTFINE_COUNTS[city]
    return np.asarray(domains, dtype=np.int64)


def _splits(task, step, mode, domains=None):
    domains = _standard_domains() if domains is None else domains
    return [
        set(domain_split_indices(domains, task, step, split, mode).tolist()) for split in ("train", "val", "test")
    ]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A data root holding a tiny SyntheticCityscapes (5 images of 32x16 per city)."""
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_domain(str(root / "SyntheticCityscapes"), IMAGES_PER_CITY, 32, 16)
    return str(root)


@pytest.fixture
def cityscapes_root(tree, tmp_path):
    """A copy of the tiny tree as <root>/cityscapes, for the cityscapes_domain reader. Its files are
    hard links (fast): tests may add or remove files, never rewrite one."""
    shutil.copytree(os.path.join(tree, "SyntheticCityscapes"), tmp_path / "cityscapes", copy_function=os.link)
    return str(tmp_path)


# Label mapping and reading.

def test_train_id_lut_is_the_spec_table():
    lut = train_id_lut()
    assert lut.dtype == np.int64 and lut.shape == (256,)
    for label_id in list(range(34)) + [255]:
        assert lut[label_id] == SPEC_TRAIN_IDS.get(label_id, 255), label_id
    assert (lut[34:] == 255).all()  # ids outside the table are ignored


def test_cityscapes_folder(tmp_path):
    root = str(tmp_path)
    assert cityscapes_folder("cityscapes_domain", root) == os.path.join(root, "cityscapes")
    assert cityscapes_folder("synthetic_domain", root) == os.path.join(root, "SyntheticCityscapes")
    os.makedirs(os.path.join(root, "leftImg8bit"))
    assert cityscapes_folder("cityscapes_domain", root) == root  # --data_root is the Cityscapes folder
    with pytest.raises(ValueError, match="cityscapes_domain, synthetic_domain"):
        cityscapes_folder("cityscapes", root)


def test_read_order_and_domains(tree):
    folder = os.path.join(tree, "SyntheticCityscapes")
    listing = read_cityscapes_list(folder)
    expected = []
    for split in ("train", "val"):
        for city in sorted(city for city, city_split in CITIES if city_split == split):
            expected += [(split, city, f"{city}_000000_{frame:06d}") for frame in range(IMAGES_PER_CITY)]
    assert listing.folder == folder
    assert list(listing.images) == [
        os.path.join(folder, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png")
        for split, city, stem in expected
    ]
    assert list(listing.labels) == [
        os.path.join(folder, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
        for split, city, stem in expected
    ]
    assert listing.domains.dtype == np.int64
    assert listing.domains.tolist() == [CITY_NAMES.index(city) for _, city, _ in expected]
    assert listing.domains[0] == 0 and listing.domains[IMAGES_PER_CITY] == 9  # aachen, then bochum


def test_test_folder_is_never_read(cityscapes_root):
    folder = os.path.join(cityscapes_root, "cityscapes")
    os.makedirs(os.path.join(folder, "leftImg8bit", "test", "berlin"))
    Image.new("RGB", (32, 16)).save(os.path.join(folder, "leftImg8bit", "test", "berlin",
                                                 "berlin_000000_000000_leftImg8bit.png"))
    assert len(read_cityscapes_list(folder).images) == 21 * IMAGES_PER_CITY


# Steps (§13.4) and split modes (§13.5).

@pytest.mark.parametrize("task, steps", [
    ("11-5", [range(0, 11), range(11, 16), range(16, 21)]),
    ("11-1", [range(0, 11)] + [[domain] for domain in range(11, 21)]),
    ("1-1", [[domain] for domain in range(21)]),
    ("offline", [range(21)]),
])
@pytest.mark.parametrize("mode", ["plop", "per_city"])
def test_cities_of_each_step(task, steps, mode):
    domains = _standard_domains()
    assert len(DOMAIN_TASKS[task]) == len(steps)
    for step, expected in enumerate(steps):
        train, val, _ = _splits(task, step, mode, domains)
        assert {int(d) for d in domains[sorted(train)]} == set(expected)
        assert {int(d) for d in domains[sorted(val)]} == set(expected)


def test_cities_of_the_last_steps_by_name():
    assert [CITY_NAMES[d] for d in DOMAIN_TASKS["11-5"][2]] == ["ulm", "zurich", "frankfurt", "lindau", "munster"]
    assert [CITY_NAMES[d] for d in DOMAIN_TASKS["1-1"][1]] == ["bremen"]


@pytest.mark.parametrize("task", sorted(PLOP_SIZES))
def test_plop_mode_reproduces_the_spec_sizes(task):
    trains, vals, tests = PLOP_SIZES[task]
    for step in DOMAIN_TASKS[task]:
        train, val, test = _splits(task, step, "plop")
        assert (len(train), len(val), len(test)) == (trains[step], vals[step], tests[step]), step
        assert not train & val


def test_plop_mode_train_test_overlap_of_the_spec():
    # §13.5 / defect C1: test images that were training images at some step <= t.
    for task, step, expected in (("11-5", 0, 0), ("11-5", 1, 387), ("11-5", 2, 496), ("11-1", 10, 501),
                                 ("1-1", 20, 541)):
        trained = set().union(*(_splits(task, earlier, "plop")[0] for earlier in range(step + 1)))
        assert len(_splits(task, step, "plop")[2] & trained) == expected, (task, step)


@pytest.mark.parametrize("task", ["11-5", "11-1", "1-1"])
def test_plop_mode_val_is_test_at_step_0(task):
    _, val, test = _splits(task, 0, "plop")
    assert val == test


@pytest.mark.parametrize("task", ["11-5", "11-1", "1-1", "offline"])
def test_per_city_mode_never_tests_on_training_images(task):
    domains = _standard_domains()
    trained, held_out = set(), set()
    for step, current in DOMAIN_TASKS[task].items():
        train, val, test = _splits(task, step, "per_city", domains)
        trained |= train
        held_out |= val
        assert not test & trained
        assert not train & val
        assert train | val == set(np.flatnonzero(np.isin(domains, current)).tolist())
        assert test == held_out  # the held-out parts of all seen cities
        for city in current:  # an 80/20 cut of every city
            assert sum(domains[i] == city for i in train) == int(0.8 * GTFINE_COUNTS[CITY_NAMES[city]])
    assert len(held_out) == sum(count - int(0.8 * count) for count in GTFINE_COUNTS.values())


def test_per_city_parts_do_not_depend_on_the_task():
    tasks = ("11-5", "11-1", "1-1", "offline")
    final = [_splits(task, len(DOMAIN_TASKS[task]) - 1, "per_city")[2] for task in tasks]
    assert all(test == final[0] for test in final)


def test_split_modes_are_fixed():
    domains = _standard_domains()
    np.random.seed(123)  # the global numpy state plays no part
    first = domain_split_indices(domains, "11-5", 1, "test", "plop")
    np.random.seed(7)
    again = domain_split_indices(domains, "11-5", 1, "test", "plop")
    assert first.dtype == np.int64 and np.array_equal(first, again) and (np.diff(first) > 0).all()


@pytest.mark.parametrize("args, message", [
    (("15-5", 0, "train", "plop"), "unknown domain task '15-5'; valid tasks: 11-5, 11-1, 1-1, offline"),
    (("11-5", 3, "train", "plop"), r"step 3 does not exist .*valid steps: 0\.\.2"),
    (("11-5", 0, "trainval", "plop"), "unknown split 'trainval'; valid splits: train, val, test"),
    (("11-5", 0, "train", "city"), "unknown domain split mode 'city'; valid modes: per_city, plop"),
])
def test_invalid_selection(args, message):
    with pytest.raises(ValueError, match=message):
        domain_split_indices(_standard_domains(), *args)
    with pytest.raises(ValueError, match=message):
        build_domain_dataset("synthetic_domain", "unused", args[0], args[1], args[2], split_mode=args[3])


# The dataset.

def test_build_on_the_synthetic_tree(tree):
    sizes = {}
    for split in ("train", "val", "test"):
        for step in (0, 1):
            sizes[split, step] = len(build_domain_dataset("synthetic_domain", tree, "11-5", step, split))
    # per_city: floor(0.8 * 5) = 4 training images of each city, 1 held out.
    assert sizes == {("train", 0): 44, ("val", 0): 11, ("test", 0): 11,
                     ("train", 1): 20, ("val", 1): 5, ("test", 1): 16}
    plop = build_domain_dataset("synthetic_domain", tree, "11-5", 0, "train", split_mode="plop")
    assert len(plop) == int(0.8 * 55)

    dataset = build_domain_dataset("synthetic_domain", tree, "11-5", 1, "test", seed=3)
    assert dataset.dataset == "synthetic_domain" and dataset.seed == 3
    assert dataset.channel_order == list(range(19))
    assert (np.diff(dataset.base_indices) > 0).all()
    image, label = dataset[0]
    assert tuple(image.shape) == (3, 16, 32) and tuple(label.shape) == (16, 32)
    raw = np.array(Image.open(dataset.label_paths[0]))
    assert np.array_equal(label.numpy(), train_id_lut()[raw])
    assert set(np.unique(label.numpy())) <= set(range(19)) | {255}
    assert 255 in label  # the ego vehicle


def test_domains_restriction(tree):
    full = build_domain_dataset("synthetic_domain", tree, "11-5", 1, "test")
    old = build_domain_dataset("synthetic_domain", tree, "11-5", 1, "test", domains=range(11))
    new = build_domain_dataset("synthetic_domain", tree, "11-5", 1, "test", domains=[11, 12, 13, 14, 15])
    assert (len(old), len(new)) == (11, 5)
    assert sorted(old.image_paths + new.image_paths) == sorted(full.image_paths)
    assert all(f"/{CITY_NAMES[d]}/" in path for d, path in zip(range(11, 16), new.image_paths))
    with pytest.raises(ValueError, match="unknown domain ids"):
        build_domain_dataset("synthetic_domain", tree, "11-5", 1, "test", domains=[21])


def test_cityscapes_domain_reads_the_folder_or_its_parent(cityscapes_root):
    from_parent = build_domain_dataset("cityscapes_domain", cityscapes_root, "1-1", 2, "val")
    folder = os.path.join(cityscapes_root, "cityscapes")
    from_folder = build_domain_dataset("cityscapes_domain", folder, "1-1", 2, "val")
    assert from_parent.image_paths == from_folder.image_paths
    assert len(from_folder) == 1 and "/darmstadt/" in from_folder.image_paths[0]


# Errors.

def test_missing_root_and_cityscapes_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root .*nowhere.* does not exist"):
        build_domain_dataset("cityscapes_domain", str(tmp_path / "nowhere"), "11-5", 0, "train")
    with pytest.raises(FileNotFoundError) as error:
        build_domain_dataset("cityscapes_domain", str(tmp_path), "11-5", 0, "train")
    message = str(error.value)
    assert os.path.join(str(tmp_path), "cityscapes") in message
    assert "leftImg8bit/ and gtFine/" in message and "--data_root" in message and "parent" in message


@pytest.mark.parametrize("missing", ["leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"])
def test_missing_split_folder(cityscapes_root, missing):
    path = os.path.join(cityscapes_root, "cityscapes", *missing.split("/"))
    shutil.rmtree(path)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train, leftImg8bit/val") as error:
        build_domain_dataset("cityscapes_domain", cityscapes_root, "11-5", 2, "train")
    assert repr(path) in str(error.value)


def test_unknown_city_folder(cityscapes_root):
    berlin = os.path.join(cityscapes_root, "cityscapes", "leftImg8bit", "train", "berlin")
    os.makedirs(berlin)
    with pytest.raises(DatasetError, match="leftImg8bit/test") as error:
        build_domain_dataset("cityscapes_domain", cityscapes_root, "11-5", 0, "train")
    message = str(error.value)
    assert repr(berlin) in message and all(city in message for city in CITY_NAMES)


def test_missing_label(cityscapes_root):
    label = os.path.join(cityscapes_root, "cityscapes", "gtFine", "val", "lindau",
                         "lindau_000000_000002_gtFine_labelIds.png")
    os.remove(label)
    with pytest.raises(FileNotFoundError, match="<city>_<seq>_<frame>_gtFine_labelIds.png") as error:
        build_domain_dataset("cityscapes_domain", cityscapes_root, "11-5", 0, "train")
    assert repr(label) in str(error.value) and "lindau_000000_000002_leftImg8bit.png" in str(error.value)


def test_missing_city_fails_only_the_steps_that_need_it(cityscapes_root):
    folder = os.path.join(cityscapes_root, "cityscapes")
    for kind in ("leftImg8bit", "gtFine"):
        shutil.rmtree(os.path.join(folder, kind, "train", "bremen"))
    shutil.rmtree(os.path.join(folder, "leftImg8bit", "val", "lindau"))  # a half-extracted city
    with pytest.raises(FileNotFoundError, match="incomplete") as error:
        build_domain_dataset("cityscapes_domain", cityscapes_root, "11-5", 0, "train")
    message = str(error.value)
    assert "bremen" in message and "leftImg8bit/train/bremen/" in message and "lindau" not in message
    assert len(build_domain_dataset("cityscapes_domain", cityscapes_root, "11-5", 1, "train")) == 20
    with pytest.raises(FileNotFoundError, match="bremen"):  # the test set covers all seen cities
        build_domain_dataset("cityscapes_domain", cityscapes_root, "11-5", 1, "test")
    with pytest.raises(FileNotFoundError, match="bremen, lindau"):
        build_domain_dataset("cityscapes_domain", cityscapes_root, "11-5", 2, "test")
    assert len(build_domain_dataset("cityscapes_domain", cityscapes_root, "1-1", 2, "train")) == 4


def test_empty_selection(tree, tmp_path):
    with pytest.raises(DatasetError, match=r"no image .*val step 1 of synthetic_domain task '11-5'"):
        build_domain_dataset("synthetic_domain", tree, "11-5", 1, "val", domains=[0])
    generate_synthetic_domain(str(tmp_path / "SyntheticCityscapes"), 1, 32, 16)  # floor(0.8 * 1) = 0
    with pytest.raises(DatasetError, match=r"train step 3 of synthetic_domain task '1-1'"):
        build_domain_dataset("synthetic_domain", str(tmp_path), "1-1", 3, "train")


# The synthetic generator.

def _files(folder):
    found = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                found[os.path.relpath(os.path.join(directory, name), folder)] = handle.read()
    return found


def test_generator_is_deterministic(tmp_path):
    first = _files(generate_synthetic_domain(str(tmp_path / "a"), 2, 32, 16))
    second = _files(generate_synthetic_domain(str(tmp_path / "b"), 2, 32, 16))
    assert first == second and len(first) == 2 * 21 * 2 + 1
    third = _files(generate_synthetic_domain(str(tmp_path / "c"), 2, 32, 16, seed=1))
    assert first.keys() == third.keys() and first != third


def test_generator_marker(tmp_path):
    folder = str(tmp_path / "SyntheticCityscapes")
    generate_synthetic_domain(folder, 2, 32, 16)
    stray = os.path.join(folder, "leftImg8bit", "train", "aachen", "stray.txt")
    open(stray, "w").close()
    generate_synthetic_domain(folder, 2, 32, 16)  # same parameters: left alone
    assert os.path.exists(stray)
    generate_synthetic_domain(folder, 3, 32, 16)  # other parameters: redone from scratch
    assert not os.path.exists(stray)
    assert len(os.listdir(os.path.join(folder, "gtFine", "val", "munster"))) == 3
    open(stray, "w").close()
    os.remove(os.path.join(folder, MARKER))  # an interrupted run
    generate_synthetic_domain(folder, 3, 32, 16)
    assert not os.path.exists(stray) and os.path.exists(os.path.join(folder, MARKER))


def test_ensure_keeps_other_parameters_but_redoes_another_generator_version(tmp_path):
    import json

    from segmentation.data.synthetic_domain import ensure_synthetic_domain

    folder = generate_synthetic_domain(str(tmp_path / "SyntheticCityscapes"), 2, 32, 16)
    assert ensure_synthetic_domain(str(tmp_path)) == folder
    assert len(os.listdir(os.path.join(folder, "gtFine", "val", "munster"))) == 2  # a test tree: kept
    marker = os.path.join(folder, MARKER)
    params = json.loads(open(marker).read())
    params["version"] -= 1  # written by an earlier generator: its images are stale
    with open(marker, "w") as handle:
        json.dump(params, handle)
    ensure_synthetic_domain(str(tmp_path))
    assert len(os.listdir(os.path.join(folder, "gtFine", "val", "munster"))) == 12  # the default tree


def test_default_tree_is_written_on_first_use(tmp_path):
    dataset = build_domain_dataset("synthetic_domain", str(tmp_path), "offline", 0, "train")
    assert len(dataset) == 21 * int(0.8 * 12)
    listing = read_cityscapes_list(os.path.join(str(tmp_path), "SyntheticCityscapes"))
    assert len(listing.images) == 21 * 12
    for city in (0, 11, 20):
        paths = [label for label, domain in zip(listing.labels, listing.domains) if domain == city]
        values = set().union(*(np.unique(np.array(Image.open(path))).tolist() for path in paths))
        assert set(SPEC_TRAIN_IDS) <= values  # every class in every city
        assert {0, 1, 4} <= values  # unlabeled, ego vehicle, static: ignored after mapping
    with Image.open(listing.images[0]) as image:
        assert image.size == (96, 48) and image.mode == "RGB"
    with Image.open(listing.labels[0]) as label:
        assert label.mode == "L"


def _class_means(domain, indices=range(6)):
    sums, counts = np.zeros((256, 3)), np.zeros(256)
    for index in indices:
        image, label = synthetic_domain_item(0, domain, index, 96, 48)
        np.add.at(sums, label.ravel(), image.reshape(-1, 3))
        np.add.at(counts, label.ravel(), 1)
    ids = sorted(SPEC_TRAIN_IDS)
    return sums[ids] / counts[ids, None]


def test_every_class_in_most_default_images():
    ids = set(SPEC_TRAIN_IDS)
    complete = sum(ids <= set(np.unique(synthetic_domain_item(0, domain, index, 96, 48)[1]).tolist())
                   for domain in range(21) for index in range(4))
    assert complete >= 0.9 * 21 * 4


def test_appearances_are_a_permutation_per_domain():
    styles = [domain_style(domain) for domain in range(21)]
    for style in styles:
        assert sorted(style.appearance) == list(range(19))
        assert sorted(style.band_order) == sorted(STUFF)
    assert len({style.appearance for style in styles}) == 21
    assert len({(style.pattern, style.period) for style in styles}) == 21  # the domains look different
    # Old (0-10) against new (11-15) cities: most classes change appearance, and most bands move.
    for old in range(11):
        for new in range(11, 16):
            same = sum(a == b for a, b in zip(styles[old].appearance, styles[new].appearance))
            assert same <= 4
    for cls in STUFF:  # no band keeps one place in every domain
        assert len({style.band_order.index(cls) for style in styles}) >= 4
    assert np.allclose(class_colour(0, 3), appearance_colour(styles[3].appearance[0]))


def test_appearance_is_consistent_within_a_domain_and_conflicts_across():
    first, again, other = _class_means(0, range(3)), _class_means(0, range(3, 6)), _class_means(11)
    # The same class in two halves of a domain: close; in another domain: far apart for most classes.
    assert np.linalg.norm(first - again, axis=1).max() < 25
    assert np.median(np.linalg.norm(first - other, axis=1)) > 60
    # One appearance worn by different classes: class c of domain 0 matches class c' != c of domain 11.
    a, b = domain_style(0).appearance, domain_style(11).appearance
    pairs = [(c, b.index(a[c])) for c in range(19) if b.index(a[c]) != c]
    assert len(pairs) >= 15
    close = [np.linalg.norm(first[c] - other[d]) < np.linalg.norm(first[c] - other[c]) for c, d in pairs]
    assert np.mean(close) > 0.7


def test_colour_does_not_tell_the_class_across_domains():
    """Nearest class colour fitted on one domain: right within it, mostly wrong in another."""
    centres = _class_means(0, range(4))
    ids = sorted(SPEC_TRAIN_IDS)

    def accuracy(domain):
        image, label = synthetic_domain_item(0, domain, 5, 96, 48)
        known = np.isin(label, ids)
        nearest = np.argmin(((image[known][:, None].astype(float) - centres) ** 2).sum(-1), 1)
        return np.mean(np.asarray(ids)[nearest] == label[known])

    assert accuracy(0) > 0.5 and accuracy(11) < 0.2


def test_generator_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"valid domain ids: 0\.\.20"):
        synthetic_domain_item(0, 21, 0, 32, 16)
    with pytest.raises(ValueError, match="at least 16x16"):
        generate_synthetic_domain(str(tmp_path), 2, 32, 8)
