"""Data files are untrusted: CIFAR's python pickles are read by a restricted unpickler that admits only plain
containers and NumPy arrays (``models.utils.safe_pickle``); a crafted file is refused and never runs code."""

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from datamodules.continual import load_cifar100
from models.utils.safe_pickle import load_numpy_pickle


def _s(text: bytes) -> bytes:
    """Python 2's SHORT_BINSTRING / BINSTRING (a ``str`` of Python 2, read back with encoding latin1)."""
    return b"U" + bytes([len(text)]) + text if len(text) < 256 else b"T" + struct.pack("<i", len(text)) + text


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for CIFAR-100's ``{'data': uint8 (N, 3072),
    'fine_labels': [...]}``, assembled opcode by opcode (Python 3 cannot write Python 2 strings): the layout of
    the files torchvision downloads. Globals: numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype."""
    n, width = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" b"cnumpy\nndarray\n" b"K\x00\x85" + _s(b"b") + b"\x87R"
             b"(K\x01" + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86"
             b"cnumpy\ndtype\n" + _s(b"u1") + b"K\x00K\x01\x87R"
             b"(K\x03" + _s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89" + _s(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}(" + _s(b"data") + array + _s(b"fine_labels") + label_list
            + _s(b"batch_label") + _s(b"training batch 1 of 1") + b"u.")


def _cifar_dict(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(n)),
            "filenames": [f"img_{i}.png" for i in range(n)], "batch_label": "training batch 1 of 1"}


def test_python2_cifar_layout_is_read(tmp_path):
    entry = _cifar_dict()
    path = tmp_path / "cifar-100-python" / "train"
    path.parent.mkdir()
    raw = python2_cifar_pickle(entry["data"], entry["fine_labels"])
    assert pickle.loads(raw, encoding="latin1")["data"].tobytes() == entry["data"].tobytes()  # a valid pickle
    path.write_bytes(raw)
    images, labels = load_cifar100(tmp_path, train=True)
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3]
    assert images.numpy().reshape(4, 3072).tobytes() == entry["data"].tobytes()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_numpy_writes_is_read(tmp_path, protocol):
    entry = {**_cifar_dict(), "raw": b"\x00\xff bytes", "floats": np.arange(3.0).reshape(3, 1).T,
             "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))}
    (tmp_path / "f").write_bytes(pickle.dumps(entry, protocol=protocol))
    loaded = load_numpy_pickle(tmp_path / "f")
    assert loaded.keys() == entry.keys()
    for key, value in entry.items():
        if isinstance(value, np.ndarray):
            assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key


class _Shell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("payload", ["os.system", "exec", "eval in a list", "object array", "array subclass"])
def test_crafted_file_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "ran"
    evil = {
        "os.system": _Shell(f"touch {marker}"),
        "exec": type("E", (), {"__reduce__": lambda self: (exec, (f"open({str(marker)!r}, 'w')",))})(),
        "eval in a list": [1, type("V", (), {"__reduce__": lambda self: (eval, (f"open({str(marker)!r}, 'w')",))})()],
        "object array": np.array([1, "x"], dtype=object),
        "array subclass": np.ma.masked_array([1, 2]),
    }[payload]
    path = tmp_path / "cifar-100-python" / "train"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"data": evil, "fine_labels": [0]}))
    with pytest.raises(ValueError) as e:
        load_cifar100(tmp_path, train=True)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert "refusing it" in message or "object dtype" in message
    assert not marker.exists()


def test_crafted_cifar_file_fails_in_one_line_through_the_cli(in_tmp, capsys):
    from tests.cli_helpers import REPO, run_cli

    marker = in_tmp / "ran"
    path = in_tmp / "cifar" / "cifar-100-python" / "train"
    path.parent.mkdir(parents=True)
    for name in ("train", "test"):
        (path.parent / name).write_bytes(pickle.dumps({"data": _Shell(f"touch {marker}"), "fine_labels": [0]}))
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", str(REPO / "configs/sema_nested.yaml"), "--data.dataset", "cifar100",
                 "--data.root", "cifar", "--model.pretrain.classes", "2", "--model.pretrain.images_per_class", "2",
                 "--model.pretrain.steps", "1", "--trainer.max_steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "'posix.system', which could run code" in lines[0] and str(Path("cifar/cifar-100-python")) in lines[0]
    assert not marker.exists() and not (in_tmp / "runs").exists()
