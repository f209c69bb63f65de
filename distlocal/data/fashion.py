"""Fashion-MNIST from the IDX files (gzipped or raw) Debian's ``dataset-fashion-mnist`` installs."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets.mnist import read_image_file, read_label_file

from distlocal.config import DataConfig
from distlocal.data.common import DataBundle, resolve_root
from distlocal.errors import ConfigError

# Pixel statistics of the Fashion-MNIST training images (28x28, before padding).
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the files (the default ``data.root``)."""
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class FashionMNIST(Dataset):
    """Images decoded once into one uint8 tensor ``(N, 1, 32, 32)`` (28x28 zero-padded by 2).

    ``__getitem__`` works on tensors only (no PIL): scale and normalise, then, with ``augment``,
    the standard random crop (padding 4) and horizontal flip, drawn from the process's torch RNG.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[index].float() / 255.0 - FASHION_MEAN) / FASHION_STD
        if self.augment:
            # Pad with the normalised value of a black pixel: the padding looks like background.
            x = F.pad(x, (4, 4, 4, 4), value=-FASHION_MEAN / FASHION_STD)
            i, j = torch.randint(0, 9, (2,)).tolist()
            x = x[:, i: i + 32, j: j + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.labels[index]


def _idx_path(root: Path, stem: str) -> Path | None:
    """``<stem>.gz`` if present, else the raw ``<stem>``; ``None`` when neither exists."""
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx(path: Path, images: bool) -> torch.Tensor:
    """One IDX file through torchvision's MNIST reader; a bad file is a ConfigError naming it."""
    reader = read_image_file if images else read_label_file
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        # torchvision's reader opens the path itself and does not decompress: inflate to a
        # temporary file first (never next to the data: /usr/share is read-only).
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            return reader(str(raw)).clone()  # the tensor shares the buffer of a file about to go
    except (AssertionError, RuntimeError, ValueError, TypeError, EOFError, OSError, IndexError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"Fashion-MNIST file '{path}' is truncated or corrupt ({detail[:120]}); "
            "reinstall it: apt-get install --reinstall dataset-fashion-mnist"
        ) from exc


def locate_fashion_mnist(cfg: DataConfig) -> tuple[Path, dict[str, Path]]:
    """The root and the four IDX files (gzipped or raw; nothing is read); a :class:`ConfigError`
    naming the missing ones otherwise."""
    root_cfg = cfg.root if cfg.root not in (None, "") else FASHION_ROOT
    root = resolve_root(DataConfig(name=cfg.name, root=str(root_cfg)))
    paths = {k: _idx_path(root, stem) for k, stem in FASHION_FILES.items()}
    missing = [f"{FASHION_FILES[k]}[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise ConfigError(
            f"fashion_mnist not found under '{root}' (missing {', '.join(missing)}); "
            "install it with 'apt-get install dataset-fashion-mnist' (or 'make data'), or put the four "
            "upstream files from https://github.com/zalandoresearch/fashion-mnist there and set data.root"
        )
    return root, paths  # type: ignore[return-value]


def build_fashion_mnist(cfg: DataConfig) -> DataBundle:
    """Fashion-MNIST from ``data.root`` (default :data:`FASHION_ROOT`), padded to 32x32."""
    root, paths = locate_fashion_mnist(cfg)
    tensors = {k: _read_idx(p, images=k.endswith("images")) for k, p in paths.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        x, y = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if x.shape[0] != y.shape[0] or tuple(x.shape[1:]) != (28, 28):
            raise ConfigError(
                f"Fashion-MNIST {split} files under '{root}' hold images {tuple(x.shape)} and "
                f"{y.shape[0]} labels; expected (N, 28, 28) and N labels; reinstall the data"
            )
        if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < 10:
            raise ConfigError(
                f"Fashion-MNIST {split} labels under '{root}' are outside [0, 10); reinstall the data")

    def padded(x: torch.Tensor) -> torch.Tensor:
        # 28 -> 32 so the CIFAR-style networks apply unchanged; kept uint8 (60,000 images: 61 MB).
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).contiguous()

    train_x, test_x = padded(tensors["train_images"]), padded(tensors["test_images"])
    train_y, test_y = tensors["train_labels"], tensors["test_labels"]
    return DataBundle(
        train=FashionMNIST(train_x, train_y, augment=bool(cfg.augment)),
        test=FashionMNIST(test_x, test_y, augment=False),
        in_shape=(1, 32, 32),
        num_classes=10,
        train_plain=FashionMNIST(train_x, train_y, augment=False),
    )
