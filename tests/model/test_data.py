import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from model import data
from model.checkpoint import sha256_file
from model.data import DatasetNotFound, read_idx


def write_idx(path, array, compress):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / "x.idx", images, compress)
    assert np.array_equal(read_idx(tmp_path / "x.idx"), images)
    ints = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    write_idx(tmp_path / "i.idx", ints, compress)
    assert np.array_equal(read_idx(tmp_path / "i.idx"), ints)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")
    images = np.zeros((5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / "short", images, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-7])
    with pytest.raises(ValueError, match="promises 60 bytes"):
        read_idx(tmp_path / "short")


def make_fake_mnist(root, n_train=30, n_test=10):
    d = root / "mnist"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), True)
    write_idx(d / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train, dtype=np.uint8), True)
    # the uncompressed twin of a .gz name is accepted too
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), False)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test, dtype=np.uint8), True)
    return root


def test_load_mnist_layout(tmp_path):
    ds = data.load_dataset("mnist", make_fake_mnist(tmp_path))
    assert ds.train.shape == (30, 1, 28, 28) and ds.test.shape == (10, 1, 28, 28)
    assert ds.train.dtype == torch.uint8 and ds.train_labels.shape == (30,)


def test_missing_dataset_names_files_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("VAE_DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFound) as e:
        data.load_dataset("fashion-mnist", tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "python -m model.download fashion-mnist" in msg and "--data-root" in msg


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", str(make_fake_mnist(tmp_path)))
    assert data.load_dataset("mnist").test.shape[0] == 10


def test_frey_face_mat(tmp_path):
    from scipy.io import savemat

    faces = np.random.default_rng(0).integers(0, 256, (50, 28, 20), dtype=np.uint8)
    (tmp_path / "frey-face").mkdir()
    # the file stores one column per image: ff is (560, N)
    savemat(tmp_path / "frey-face" / "frey_rawface.mat", {"ff": faces.reshape(50, -1).T})
    assert np.array_equal(data.read_frey_face(tmp_path / "frey-face" / "frey_rawface.mat"), faces)
    ds = data.load_dataset("frey-face", tmp_path)
    assert ds.train.shape == (45, 1, 28, 20) and ds.test.shape == (5, 1, 28, 20)
    together = torch.cat([ds.train, ds.test]).reshape(50, -1).sort(0).values
    assert torch.equal(together, torch.from_numpy(faces).reshape(50, -1).sort(0).values)


def test_image_folder_any_size_and_mode(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (5, 5), 128).save(tmp_path / "b.jpg")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.PNG")
    (tmp_path / "notes.txt").write_text("ignored")
    images = data.read_image_folder(tmp_path, (3, 16, 16))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert images[0, 0].float().mean() > 250 and images[0, 1:].float().mean() < 5  # red stays red
    assert images[2].max() == 0  # transparent -> black background
    gray = data.read_image_folder(tmp_path, (1, 8, 8))
    assert gray.shape == (3, 1, 8, 8)


def test_binarisation():
    x = torch.full((1000,), 0.25)
    b = data.binarize(x, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0} and abs(b.mean().item() - 0.25) < 0.05
    assert torch.equal(data.fixed_binarized(x), data.fixed_binarized(x))


def test_download_verifies_checksums_against_local_files(tmp_path, monkeypatch):
    source = make_fake_mnist(tmp_path / "src") / "mnist"
    (source / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress((source / "t10k-images-idx3-ubyte").read_bytes()))
    files = tuple(
        data.RemoteFile(f.name, hashlib.sha256((source / f.name).read_bytes()).hexdigest())
        for f in data.DATASETS["mnist"].files
    )
    fake = data.DatasetSpec("mnist", files, (source.as_uri() + "/",), (1, 28, 28), "bernoulli")
    monkeypatch.setitem(data.DATASETS, "mnist", fake)
    out = data.download("mnist", tmp_path / "dst")
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in files)
    assert data.load_dataset("mnist", tmp_path / "dst").train.shape[0] == 30
    # a mirror serving other bytes is refused, and nothing half-written is left behind
    bad = data.DatasetSpec(
        "mnist", (data.RemoteFile(files[0].name, "0" * 64),), (source.as_uri() + "/",), (1, 28, 28), "bernoulli"
    )
    monkeypatch.setitem(data.DATASETS, "mnist", bad)
    with pytest.raises(OSError, match="sha256 mismatch"):
        data.download("mnist", tmp_path / "dst2")
    assert not any((tmp_path / "dst2" / "mnist").iterdir())


def test_real_files_match_their_checksums(shared_data):
    for spec in data.DATASETS.values():
        for f in spec.files:
            assert sha256_file(shared_data / spec.name / f.name) == f.sha256


def test_sixteen_bit_grey_is_scaled_not_clipped():
    import io

    from model.preprocess import pil_to_tensor

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    buf.seek(0)
    with Image.open(buf) as im:
        x = pil_to_tensor(im, (1, 32, 32))
    assert abs(float(x.mean()) - 0.5) < 0.01 and float(x.min()) == 0.0 and float(x.max()) == 1.0
