"""Dataset readers: MNIST and Fashion-MNIST (IDX, gzipped or not), Frey Face (MATLAB .mat), and a folder of
PNG/JPEG images. Images come back as uint8 tensors (N, C, H, W); `to_float` and `binarize` turn them into model
inputs. Nothing here downloads unless asked (`download`), and every download is checked against its sha256.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import sha256_file
from model.preprocess import binarize

DEFAULT_DATA_ROOT = "./data"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class RemoteFile:
    name: str
    sha256: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...]  # base URLs tried in order
    input_shape: tuple[int, int, int]
    likelihood: str  # the decoder that fits the data: "bernoulli" (binarised) or "gaussian" (continuous)


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist",
        tuple(
            map(
                RemoteFile,
                _MNIST_FILES,
                (
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                ),
            )
        ),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        (1, 28, 28),
        "bernoulli",
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        tuple(
            map(
                RemoteFile,
                _MNIST_FILES,
                (
                    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                    "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                    "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                ),
            )
        ),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        (1, 28, 28),
        "bernoulli",
    ),
    "frey-face": DatasetSpec(
        "frey-face",
        (RemoteFile("frey_rawface.mat", "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64"),),
        ("https://cs.nyu.edu/~roweis/data/",),
        (1, 28, 20),
        "gaussian",
    ),
}
FREY_TEST_FRACTION = 0.1  # Frey Face has no official split: a fixed, seeded 10% is held out.
SPLIT_SEED = 0


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not under the data root."""


@dataclass
class ImageData:
    """A dataset's train and test images (uint8, (N, C, H, W)) and labels (int64, (N,)) when it has them."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.shape[1:]
        return (int(c), int(h), int(w))


def default_data_root() -> str:
    return os.environ.get("VAE_DATA_ROOT", DEFAULT_DATA_ROOT)


# -- file formats ------------------------------------------------------------------------------------------------
def _open_maybe_gzip(path: Path) -> gzip.GzipFile | io.BufferedReader:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not, into a numpy array of its stored shape."""
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes of data, file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_frey_face(path: str | os.PathLike[str]) -> np.ndarray:
    """frey_rawface.mat -> uint8 (1965, 28, 20). The file holds one variable `ff` of shape (560, 1965)."""
    from scipy.io import loadmat  # reading a .mat with scipy runs no code from the file

    ff = loadmat(str(path))["ff"]
    return np.ascontiguousarray(ff.T.reshape(-1, 28, 20))


def read_image_folder(directory: str | os.PathLike[str], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Every PNG/JPEG under `directory` (sorted, recursive), converted like the service does -> uint8 (N, C, H, W)."""
    from PIL import Image

    from model.preprocess import pil_to_tensor

    paths = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetNotFound(f"no PNG or JPEG images found under {directory}")
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append((pil_to_tensor(im, input_shape) * 255).round().to(torch.uint8))
    return torch.stack(images)


# -- datasets ----------------------------------------------------------------------------------------------------
def dataset_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    return Path(root or default_data_root()) / name


def _find(spec: DatasetSpec, root: str | os.PathLike[str] | None) -> dict[str, Path]:
    """Each expected file's path, accepting the gzipped name or its uncompressed twin."""
    directory = dataset_dir(spec.name, root)
    found, missing = {}, []
    for f in spec.files:
        candidates = [directory / f.name]
        if f.name.endswith(".gz"):
            candidates.append(directory / f.name[: -len(".gz")])
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(f.name)
        else:
            found[f.name] = path
    if missing:
        raise DatasetNotFound(
            f"dataset {spec.name!r} not found: expected {', '.join(missing)} in {directory}. "
            f"Point --data-root (or VAE_DATA_ROOT) at the folder that holds {spec.name}/, or fetch it with "
            f"`python -m model.download {spec.name} --data-root {Path(root or default_data_root())}`."
        )
    return found


def _split(n: int, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> ImageData:
    """Load a named dataset ("mnist", "fashion-mnist", "frey-face") or, for "folder", the images in `image_dir`."""
    if name == "folder":
        if image_dir is None or input_shape is None:
            raise ValueError("the folder dataset needs an image directory and the model's input shape")
        images = read_image_folder(image_dir, input_shape)
        train_idx, test_idx = _split(len(images), FREY_TEST_FRACTION)
        return ImageData(name, images[train_idx], images[test_idx])
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS) + ['folder']}")
    spec = DATASETS[name]
    paths = _find(spec, root)
    if name == "frey-face":
        images = torch.from_numpy(read_frey_face(paths["frey_rawface.mat"])).unsqueeze(1)
        train_idx, test_idx = _split(len(images), FREY_TEST_FRACTION)
        return ImageData(name, images[train_idx], images[test_idx])
    arrays = [torch.from_numpy(read_idx(paths[f.name])) for f in spec.files]
    train, train_labels, test, test_labels = arrays
    return ImageData(name, train.unsqueeze(1), test.unsqueeze(1), train_labels.long(), test_labels.long())


# -- turning bytes into model inputs -----------------------------------------------------------------------------
def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def fixed_binarized(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The evaluation set: binarised once with a fixed seed so figures are comparable run to run."""
    return binarize(x, torch.Generator().manual_seed(seed))


# -- downloads ---------------------------------------------------------------------------------------------------
def download(name: str, root: str | os.PathLike[str] | None = None, mirrors: tuple[str, ...] | None = None) -> Path:
    """Fetch a dataset's files from its canonical URLs (or `mirrors`), verifying each file's sha256.

    A file already present with the right hash is kept. A download with the wrong hash is deleted and the next
    mirror is tried; when none gives the right bytes, this raises with every error seen.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; downloadable: {sorted(DATASETS)}")
    spec = DATASETS[name]
    directory = dataset_dir(name, root)
    directory.mkdir(parents=True, exist_ok=True)
    for f in spec.files:
        target = directory / f.name
        if target.is_file() and sha256_file(target) == f.sha256:
            continue
        errors = []
        for base in mirrors or spec.mirrors:
            url = base.rstrip("/") + "/" + f.name
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{f.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
                digest = sha256_file(tmp)
                if digest != f.sha256:
                    raise ValueError(f"sha256 mismatch: got {digest}, expected {f.sha256}")
                os.replace(tmp, target)
                break
            except Exception as e:  # noqa: BLE001 - any failure moves on to the next mirror
                errors.append(f"{url}: {e}")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            raise OSError(f"could not download {f.name} for {name}:\n  " + "\n  ".join(errors))
    return directory
