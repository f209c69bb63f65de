"""Tests of distlocal.data: the data sets (with tiny on-disk fixtures) and the per-rank loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from distlocal.config import DataConfig
from distlocal.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    FASHION_MEAN,
    FASHION_STD,
    DataBundle,
    SyntheticDataset,
    build_datasets,
    build_loaders,
)
from distlocal.data import cifar as cifar_mod
from distlocal.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# fixtures


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6) -> Path:
    """A CIFAR-10-format copy under ``root/cifar-10-batches-py`` with ``5*per_batch`` train samples."""
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def batch(n: int) -> dict[bytes, object]:
        return {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        }

    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (d / "test_batch").write_bytes(pickle.dumps(batch(test)))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (d / "batches.meta").write_bytes(pickle.dumps(meta))
    return d


def write_cifar100(root: Path, train: int = 7, test: int = 3) -> Path:
    rng = np.random.default_rng(1)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)

    def split(n: int) -> dict[bytes, object]:
        return {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, size=n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, size=n)],
        }

    (d / "train").write_bytes(pickle.dumps(split(train)))
    (d / "test").write_bytes(pickle.dumps(split(test)))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    return d


def write_imagefolder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 2) -> Path:
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_datasets(DataConfig(name="digits"))


def assert_one_line_config_error(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_sizes_shape_classes(digits: DataBundle) -> None:
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.in_shape == (3, 32, 32)
    assert digits.num_classes == 10
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= int(y) < 10
    # The three channels are copies of the grey image.
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_digits_split_is_stratified(digits: DataBundle) -> None:
    train_counts = Counter(digits.train.tensors[1].tolist())
    test_counts = Counter(digits.test.tensors[1].tolist())
    assert set(train_counts) == set(test_counts) == set(range(10))
    for c in range(10):
        total = train_counts[c] + test_counts[c]
        assert abs(test_counts[c] - 0.2 * total) <= 1


def test_digits_cache_holds_sklearns_split_and_survives_damage(tmp_path: Path) -> None:
    from distlocal.data.digits import _split_from_sklearn, raw_digits

    truth = _split_from_sklearn()
    built = raw_digits(tmp_path)  # no cache yet: computed by scikit-learn, then written
    (cached,) = tmp_path.glob("digits-sklearn*.npz")
    assert not list(tmp_path.glob("*.tmp"))
    read = raw_digits(tmp_path)  # from the file
    cached.write_bytes(b"not an npz")  # damaged: rebuilt, never trusted
    rebuilt = raw_digits(tmp_path)
    blocked = raw_digits(cached)  # the cache "directory" is a file: nothing written, same arrays
    for arrays in (built, read, rebuilt, blocked):
        assert arrays.keys() == truth.keys()
        for k in truth:
            assert arrays[k].dtype == truth[k].dtype and np.array_equal(arrays[k], truth[k]), k
    assert np.load(cached)["idx_test"].shape == (360,)


def test_digits_split_identical_across_builds(digits: DataBundle) -> None:
    again = build_datasets(DataConfig(name="digits"))
    for a, b in ((digits.train, again.train), (digits.test, again.test)):
        assert all(torch.equal(t, u) for t, u in zip(a.tensors, b.tensors, strict=True))


def test_digits_normalised_with_train_statistics(digits: DataBundle) -> None:
    x = digits.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std()) - 1.0) < 1e-3
    # The test set uses the train statistics, so it is only close to, not exactly, standardised.
    assert abs(float(digits.test.tensors[0].mean())) < 0.1


# --------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_missing_root_is_one_clear_line(tmp_path: Path) -> None:
    root = tmp_path / "nope"
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="cifar10", root=str(root)))
    msg = assert_one_line_config_error(exc)
    assert "data.root" in msg and "data.download=true" in msg
    assert str(root.resolve()) in msg and "cifar-10-batches-py" in msg


def test_cifar_without_root_asks_for_it() -> None:
    with pytest.raises(ConfigError, match="data.root"):
        build_datasets(DataConfig(name="cifar100", root=None))


def test_cifar10_partial_copy_names_missing_file(tmp_path: Path) -> None:
    d = write_cifar10(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    assert "missing data_batch_3" in assert_one_line_config_error(exc)


def test_cifar10_corrupt_file_is_config_error(tmp_path: Path) -> None:
    d = write_cifar10(tmp_path)
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    assert "test_batch" in assert_one_line_config_error(exc)


def test_cifar10_loads_local_fixture(tmp_path: Path) -> None:
    d = write_cifar10(tmp_path, per_batch=4, test=6)
    bundle = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), augment=False))
    assert (len(bundle.train), len(bundle.test)) == (20, 6)
    assert bundle.in_shape == (3, 32, 32) and bundle.num_classes == 10
    x, y = bundle.test[1]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.float32
    # Pixel layout: a row is R(1024) G(1024) B(1024), row-major; the tensor must match it exactly.
    raw = pickle.loads((d / "test_batch").read_bytes())
    expected = torch.as_tensor(raw[b"data"][1].reshape(3, 32, 32), dtype=torch.float32) / 255.0
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (expected - mean) / std)
    assert y == raw[b"labels"][1]


def test_cifar10_augmented_sample_shape(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bundle = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), augment=True))
    x, _ = bundle.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_cifar100_loads_local_fixture(tmp_path: Path) -> None:
    write_cifar100(tmp_path, train=7, test=3)
    bundle = build_datasets(DataConfig(name="cifar100", root=str(tmp_path)))
    assert (len(bundle.train), len(bundle.test)) == (7, 3)
    assert bundle.num_classes == 100 and bundle.in_shape == (3, 32, 32)
    x, y = bundle.train[6]
    assert x.shape == (3, 32, 32) and 0 <= y < 100


def test_cifar100_missing_root_names_layout(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="cifar100", root=str(tmp_path)))
    assert "cifar-100-python/{train,test,meta}" in assert_one_line_config_error(exc)


def test_cifar_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    class FakeCIFAR10:  # stands in for the network: "downloads" by writing the fixture
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            write_cifar10(Path(root))

    monkeypatch.setattr(cifar_mod.datasets, "CIFAR10", FakeCIFAR10)
    bundle = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    assert calls == [(str(tmp_path.resolve()), True)]
    assert len(bundle.train) == 20
    # Present files are not downloaded again.
    build_datasets(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX fixture; CI does not need the Debian package)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """An IDX (MNIST-format) file: magic 0x0000 08 <ndim> (uint8), big-endian dims, then the bytes."""
    payload = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_fashion(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(root / name, a, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_loads_idx_fixture(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion(tmp_path, gz=gz)
    bundle = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), augment=False))
    assert (len(bundle.train), len(bundle.test)) == (12, 5)
    assert bundle.in_shape == (1, 32, 32) and bundle.num_classes == 10
    x, y = bundle.test[4]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and int(y) == (4 * 3) % 10
    # 28x28 zero-padded by 2 on each side, scaled to [0, 1] and normalised.
    raw = torch.as_tensor(arrays["t10k-images-idx3-ubyte"][4], dtype=torch.float32) / 255.0
    torch.testing.assert_close(x[0, 2:30, 2:30], (raw - FASHION_MEAN) / FASHION_STD)
    torch.testing.assert_close(x[0, :2], torch.full((2, 32), -FASHION_MEAN / FASHION_STD))
    assert [int(bundle.train[i][1]) for i in range(12)] == [i % 10 for i in range(12)]


def test_fashion_mnist_augmentation_is_a_shifted_flipped_crop(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    plain = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), augment=False))
    aug = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), augment=True))
    bg = -FASHION_MEAN / FASHION_STD
    x0 = plain.train[0][0][0]
    padded = torch.nn.functional.pad(x0, (4, 4, 4, 4), value=bg)
    candidates = [padded[i: i + 32, j: j + 32] for i in range(9) for j in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        x = aug.train[0][0][0]
        hits = [k for k, c in enumerate(candidates) if torch.equal(c, x)]
        assert hits, "an augmented sample is a crop (padding 4) of the image, possibly flipped"
        seen.add(hits[0])
    assert len(seen) > 1  # it is random
    assert torch.equal(aug.test[0][0], plain.test[0][0])  # the test set is never augmented


def test_fashion_mnist_missing_root_is_one_line_naming_apt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    msg = assert_one_line_config_error(exc)
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path.resolve()) in msg


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_truncated_file_is_named(tmp_path: Path, gz: bool) -> None:
    write_fashion(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert name in assert_one_line_config_error(exc)


def test_val_fraction_holds_out_a_seeded_unaugmented_split(tmp_path: Path) -> None:
    write_fashion(tmp_path, n_train=40)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), val_fraction=0.25, val_seed=7)
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert a.val is not None and (len(a.train), len(a.val)) == (30, 10)
    assert a.val.indices == b.val.indices and a.train.indices == b.train.indices
    assert not set(a.val.indices) & set(a.train.indices)
    other = build_datasets(
        DataConfig(name="fashion_mnist", root=str(tmp_path), val_fraction=0.25, val_seed=8))
    assert other.val.indices != a.val.indices
    torch.manual_seed(0)
    assert torch.equal(a.val[3][0], a.train_plain.dataset[a.val.indices[3]][0])  # never augmented
    # Off by default: the existing bundles are unchanged.
    assert build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path))).val is None
    with pytest.raises(ConfigError, match="val_fraction"):
        build_datasets(DataConfig(name="digits", val_fraction=1.5))


# --------------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_loads_fixture(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    for augment in (True, False):
        bundle = build_datasets(
            DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, augment=augment)
        )
        assert (len(bundle.train), len(bundle.test)) == (4, 4)
        assert bundle.num_classes == 2 and bundle.in_shape == (3, 32, 32)
        for ds in (bundle.train, bundle.test):
            x, y = ds[3]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1


def test_imagefolder_val_uses_train_class_indices(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, classes=("a", "b", "c"))
    # val lacks class "a": its own sorted order would label "b" as 0.
    for f in (tmp_path / "val" / "a").iterdir():
        f.unlink()
    (tmp_path / "val" / "a").rmdir()
    bundle = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32))
    assert bundle.num_classes == 3
    assert sorted(bundle.test.targets) == [1, 1, 2, 2]


def test_imagefolder_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "none"), image_size=32))
    msg = assert_one_line_config_error(exc)
    assert "train/<class>" in msg and "val/<class>" in msg
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32))
    assert "'val'" in assert_one_line_config_error(exc)
    (tmp_path / "val").mkdir()
    # A class directory without images: torchvision's error, reworded as one line.
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32))
    assert_one_line_config_error(exc)


# --------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_and_shaped() -> None:
    cfg = DataConfig(name="synthetic", shape=[1, 12, 20], num_classes=5, train_size=30, test_size=10)
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert a.in_shape == (1, 12, 20) and a.num_classes == 5
    assert (len(a.train), len(a.test)) == (30, 10)
    for i in (0, 7, 29):
        (xa, ya), (xb, yb) = a.train[i], b.train[i]
        assert xa.shape == (1, 12, 20) and torch.equal(xa, xb) and ya == yb
    assert not torch.equal(a.train[0][0], a.test[0][0])
    assert sorted(Counter(int(a.train[i][1]) for i in range(30)).values()) == [6] * 5


def test_synthetic_labels_are_learnable() -> None:
    bundle = build_datasets(DataConfig(name="synthetic", num_classes=4, train_size=64, test_size=32))
    xs = torch.stack([bundle.train[i][0] for i in range(64)])
    ys = torch.tensor([bundle.train[i][1] for i in range(64)])
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(4)]).flatten(1)
    hits = sum(
        int(torch.cdist(bundle.test[i][0].flatten()[None], centroids).argmin()) == bundle.test[i][1]
        for i in range(32)
    )
    assert hits == 32  # nearest class mean: the class pattern dominates the noise


def test_synthetic_uncached_path_matches_cached() -> None:
    ds = SyntheticDataset(8, (3, 16, 16), 4, split=0, seed=1234)
    assert ds._cache is not None
    for i in range(8):
        assert torch.equal(ds[i][0], ds._make(i))


def test_synthetic_bad_shape() -> None:
    with pytest.raises(ConfigError, match="data.shape"):
        build_datasets(DataConfig(name="synthetic", shape=[32, 32]))


def test_unknown_name() -> None:
    with pytest.raises(ConfigError) as exc:
        build_datasets(DataConfig(name="mnist"))
    msg = assert_one_line_config_error(exc)
    assert msg == f"unknown data set 'mnist'; valid: {', '.join(DATASETS)}"


def test_build_datasets_accepts_composed_config() -> None:
    from distlocal.config import compose

    cfg = compose(["data=synthetic", "data.train_size=16", "data.test_size=8"])
    bundle = build_datasets(cfg.data)
    assert len(bundle.train) == 16 and bundle.in_shape == (3, 32, 32)


# --------------------------------------------------------------------------------------------------
# loaders


def index_bundle(n_train: int, n_test: int) -> DataBundle:
    """Samples are their own indices, so a batch shows which samples it holds."""
    return DataBundle(
        train=TensorDataset(torch.arange(n_train)),
        test=TensorDataset(torch.arange(n_test)),
        in_shape=(1, 1, 1),
        num_classes=2,
    )


def epoch_batches(loader: torch.utils.data.DataLoader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


def test_two_ranks_partition_train_set() -> None:
    bundle = index_bundle(101, 37)
    seen: list[list[int]] = []
    for rank in (0, 1):
        train, _, sampler = build_loaders(bundle, batch_size=10, rank=rank, world_size=2, seed=3)
        sampler.set_epoch(0)
        batches = epoch_batches(train)
        assert len(batches) == len(train) == 5 and all(len(b) == 10 for b in batches)
        seen.append([i for b in batches for i in b])
    a, b = set(seen[0]), set(seen[1])
    assert len(a) == len(seen[0]) == 50 and len(b) == 50
    assert not a & b
    # drop_last: 101 -> 100 = 2 x 50 samples; with batch 10 nothing more is dropped.
    assert len(a | b) == 100 and (a | b) <= set(range(101))


def test_test_shards_cover_every_sample_once() -> None:
    bundle = index_bundle(40, 37)
    shards = []
    for rank in (0, 1):
        _, test, _ = build_loaders(bundle, batch_size=8, rank=rank, world_size=2, seed=0)
        shards.append([i for b in epoch_batches(test) for i in b])
        # Not shuffled: same order every pass.
        assert shards[-1] == [i for b in epoch_batches(test) for i in b]
    assert sorted(shards[0] + shards[1]) == list(range(37))
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_set_epoch_changes_order_reproducibly() -> None:
    bundle = index_bundle(64, 8)
    train, _, sampler = build_loaders(bundle, batch_size=8, rank=1, world_size=2, seed=5)
    train2, _, sampler2 = build_loaders(bundle, batch_size=8, rank=1, world_size=2, seed=5)
    sampler.set_epoch(0)
    e0 = epoch_batches(train)
    assert epoch_batches(train) == e0  # same epoch, same order
    sampler.set_epoch(1)
    e1 = epoch_batches(train)
    assert e1 != e0 and sorted(sum(e1, [])) != sum(e1, [])
    sampler2.set_epoch(1)
    assert epoch_batches(train2) == e1  # a fresh loader (e.g. after resume) repeats it


def test_single_process_is_the_same_code_path() -> None:
    bundle = index_bundle(50, 10)
    train, test, sampler = build_loaders(bundle, batch_size=8, rank=0, world_size=1, seed=0)
    sampler.set_epoch(2)
    batches = epoch_batches(train)
    assert len(batches) == 6
    assert len(set(sum(batches, []))) == 48
    assert sum(epoch_batches(test), []) == list(range(10))


@pytest.mark.parametrize("world_size", [2, 4])
def test_one_process_big_batch_sees_the_same_samples_as_many_ranks(world_size: int) -> None:
    bundle = index_bundle(203, 8)
    per_rank = 5
    single, _, s1 = build_loaders(bundle, batch_size=world_size * per_rank, rank=0, world_size=1, seed=9)
    ranks = [
        build_loaders(bundle, batch_size=per_rank, rank=r, world_size=world_size, seed=9)
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        s1.set_epoch(epoch)
        for _, _, s in ranks:
            s.set_epoch(epoch)
        one = epoch_batches(single)
        many = [epoch_batches(loader) for loader, _, _ in ranks]
        assert all(len(m) == len(one) == 203 // (world_size * per_rank) for m in many)
        for step, batch in enumerate(one):
            assert sorted(batch) == sorted(i for m in many for i in m[step])


def test_batch_larger_than_rank_share_is_config_error() -> None:
    with pytest.raises(ConfigError, match="trainer.batch_size"):
        build_loaders(index_bundle(30, 4), batch_size=16, rank=0, world_size=2, seed=0)


def test_loader_with_workers_on_real_data(digits: DataBundle) -> None:
    train, test, sampler = build_loaders(digits, batch_size=64, rank=0, world_size=2, seed=0, num_workers=2)
    sampler.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
    assert sum(len(b[1]) for b in test) == 180


def test_trainer_logs_val_metrics_with_val_fraction(tmp_path: Path) -> None:
    import json

    from distlocal.config import compose
    from distlocal.trainer import train

    cfg = compose(["data=digits", "data.val_fraction=0.2", "mode=sgd", "trainer.epochs=1",
                   "trainer.max_steps_per_epoch=2", "wandb.mode=disabled", "trainer.progress=false",
                   "checkpoint.enabled=false"])
    train(cfg, tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= row["val_acc"] <= 100.0 and row["val_loss"] > 0.0
    assert row["ws_multiplier"] == 1.0 and row["ws_backoffs"] == 0
