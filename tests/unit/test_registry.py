"""The model registry store: numbering, aliases, immutability, verification, atomicity, URIs."""

from __future__ import annotations

import json
import re
import socket
import threading
from importlib import metadata
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

import kiln
from kiln.errors import RegistryError
from kiln.registry import Registry, data_fingerprint, environment
from kiln.registry import store as store_module

NAME = "digits-mlp"


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(4, 3, generator=gen), "fc.bias": torch.zeros(4)}


def _documents(accuracy: float = 0.9) -> dict[str, dict]:
    return {
        "model.json": {"architecture": "mlp", "hidden": [4]},
        "preprocessing.json": {"mean": [0.5, 0.1], "std": [1.0, 2.0]},
        "metrics.json": {"val_accuracy": accuracy},
    }


def _register(reg: Registry, name: str = NAME, seed: int = 0, **kwargs):
    return reg.register(name, _tensors(seed), _documents(), **kwargs)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"))


def _version_dir(tmp_path: Path, version: int, name: str = NAME) -> Path:
    return tmp_path / "registry" / name / str(version)


def _leftovers(tmp_path: Path, name: str = NAME) -> list[str]:
    name_dir = tmp_path / "registry" / name
    return (
        sorted(p.name for p in name_dir.iterdir() if p.name.startswith("."))
        if name_dir.exists()
        else []
    )


# ---- numbering and resolving -------------------------------------------------------------------


def test_versions_count_up_and_refs_resolve(reg: Registry, tmp_path: Path) -> None:
    registered = [_register(reg, seed=i) for i in range(3)]

    assert [mv.version for mv in registered] == [1, 2, 3]
    assert registered[1].ref == "digits-mlp:2"
    assert registered[1].uri == str(_version_dir(tmp_path, 2))
    assert reg.names() == [NAME]
    assert reg.versions(NAME) == registered
    assert reg.resolve(NAME) == registered[2]
    assert reg.resolve("digits-mlp@latest") == registered[2]
    assert reg.resolve("digits-mlp:1") == registered[0]
    assert reg.resolve("digits-mlp:1").created_at.endswith("+00:00")
    assert _register(reg, name="other").version == 1
    assert reg.names() == [NAME, "other"]


def test_version_directory_holds_the_files_and_a_manifest(reg: Registry, tmp_path: Path) -> None:
    _register(reg, extra_files={"vocab.txt": b"a\nb\n"})

    vdir = _version_dir(tmp_path, 1)
    files = sorted(p.name for p in vdir.iterdir())
    assert files == [
        "lineage.json",
        "manifest.json",
        "metrics.json",
        "model.json",
        "model.safetensors",
        "preprocessing.json",
        "vocab.txt",
    ]
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["name"] == NAME and manifest["version"] == 1
    assert sorted(manifest["files"]) == sorted(set(files) - {"manifest.json"})
    assert manifest["files"]["vocab.txt"]["size"] == 4


def test_load_round_trips_tensors_documents_and_files(reg: Registry) -> None:
    weight = torch.randn(3, 5)
    tensors = {"w_t": weight.t(), "tied.a": weight, "tied.b": weight}  # non-contiguous + shared
    extra = {"vocab.txt": b"a\nb\n", "table.csv.gz": b"not really gzip"}
    reg.register(NAME, tensors, _documents(), extra_files=extra)

    loaded = reg.load(NAME)

    assert loaded.version.ref == "digits-mlp:1"
    assert torch.equal(loaded.tensors["w_t"], weight.t())
    assert torch.equal(loaded.tensors["tied.a"], weight)
    assert torch.equal(loaded.tensors["tied.b"], weight)
    assert loaded.documents["preprocessing.json"] == _documents()["preprocessing.json"]
    assert "manifest.json" not in loaded.documents
    assert loaded.extra_files == extra
    assert loaded.manifest["version"] == 1


def test_lineage_records_the_environment(reg: Registry) -> None:
    docs = {**_documents(), "lineage.json": {"data_fingerprint": "abc"}}
    mv = reg.register(NAME, _tensors(), docs)

    lineage = reg.read_document(mv, "lineage.json")
    assert lineage["data_fingerprint"] == "abc"
    env = lineage["environment"]
    assert {"python", "kiln", "torch", "pyarrow", "hostname", "git_commit", "git_dirty"} <= set(env)
    assert env["torch"] == metadata.version("torch")

    mv2 = reg.register(NAME, _tensors(), {"model.json": {}})
    assert "environment" in reg.read_document(mv2, "lineage.json")


# ---- aliases -----------------------------------------------------------------------------------


def test_promote_points_moves_and_records_history(reg: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        _register(reg, seed=seed)

    assert reg.aliases(NAME) == {}
    assert reg.promote("digits-mlp:1", "production").version == 1
    assert reg.resolve("digits-mlp@production").version == 1
    reg.promote("digits-mlp:2", "staging")
    reg.promote(NAME, "production")  # moves to latest (3)

    assert reg.aliases(NAME) == {"production": 3, "staging": 2}
    assert reg.resolve("digits-mlp@production").version == 3
    on_disk = json.loads((tmp_path / "registry" / NAME / "aliases.json").read_text())
    assert [(h["alias"], h["version"]) for h in on_disk["history"]] == [
        ("production", 1),
        ("staging", 2),
        ("production", 3),
    ]
    assert _leftovers(tmp_path) == []


def test_promote_refuses_reserved_and_bad_aliases(reg: Registry) -> None:
    _register(reg)
    with pytest.raises(RegistryError, match="'latest' is reserved"):
        reg.promote(NAME, "latest")
    with pytest.raises(RegistryError, match="invalid alias 'prod uction'"):
        reg.promote(NAME, "prod uction")
    with pytest.raises(
        RegistryError, match=r"digits-mlp:7 does not exist; versions of digits-mlp: 1"
    ):
        reg.promote("digits-mlp:7", "production")


def test_unknown_alias_lists_the_aliases(reg: Registry) -> None:
    _register(reg)
    with pytest.raises(RegistryError, match="digits-mlp has no aliases"):
        reg.resolve("digits-mlp@production")
    reg.promote(NAME, "staging")
    with pytest.raises(
        RegistryError, match=r"no such alias; aliases of digits-mlp: staging \(-> 1\)"
    ):
        reg.resolve("digits-mlp@production")


def test_show_gives_manifest_documents_tensors_and_aliases(reg: Registry) -> None:
    _register(reg)
    _register(reg, seed=1)
    reg.promote("digits-mlp:1", "production")

    shown = reg.show("digits-mlp@production")

    assert shown["ref"] == "digits-mlp:1"
    assert shown["aliases"] == ["production"]
    assert shown["tensors"]["fc.weight"] == {"dtype": "F32", "shape": [4, 3]}
    assert shown["documents"]["metrics.json"] == {"val_accuracy": 0.9}
    assert "manifest.json" not in shown["documents"]
    assert shown["manifest"]["version"] == 1
    json.dumps(shown)  # printable by the CLI as is


# ---- immutability and verification -------------------------------------------------------------


def test_registered_versions_never_change(reg: Registry, tmp_path: Path) -> None:
    _register(reg, seed=0)
    before = {p.name: p.read_bytes() for p in _version_dir(tmp_path, 1).iterdir()}
    _register(reg, seed=1)
    after = {p.name: p.read_bytes() for p in _version_dir(tmp_path, 1).iterdir()}
    assert before == after


def test_half_written_directory_is_invisible_and_never_reused(
    reg: Registry, tmp_path: Path
) -> None:
    _register(reg)
    junk = _version_dir(tmp_path, 2)
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")

    assert [mv.version for mv in reg.versions(NAME)] == [1]
    with pytest.raises(
        RegistryError, match="digits-mlp:2 does not exist; versions of digits-mlp: 1"
    ):
        reg.resolve("digits-mlp:2")
    assert _register(reg).version == 3
    assert (junk / "model.safetensors").read_bytes() == b"partial"


def test_modified_safetensors_is_refused_at_load(reg: Registry, tmp_path: Path) -> None:
    _register(reg)
    path = _version_dir(tmp_path, 1) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(RegistryError) as err:
        reg.load("digits-mlp:1")
    assert str(err.value) == (
        "digits-mlp:1: model.safetensors failed verification "
        "(sha256 mismatch: the file was modified after registration)"
    )
    assert not torch.equal(
        reg.load(NAME, verify=False).tensors["fc.weight"], _tensors()["fc.weight"]
    )


def test_modified_document_is_refused_by_load_and_read_document(
    reg: Registry, tmp_path: Path
) -> None:
    mv = _register(reg)
    (_version_dir(tmp_path, 1) / "metrics.json").write_text('{"val_accuracy": 1.0}')

    with pytest.raises(RegistryError, match=r"digits-mlp:1: metrics.json failed verification"):
        reg.load(NAME)
    with pytest.raises(RegistryError, match=r"digits-mlp:1: metrics.json failed verification"):
        reg.read_document(mv, "metrics.json")


def test_added_file_is_refused(reg: Registry, tmp_path: Path) -> None:
    _register(reg)
    (_version_dir(tmp_path, 1) / "backdoor.bin").write_bytes(b"\x00")

    with pytest.raises(
        RegistryError, match=r"digits-mlp:1: backdoor.bin failed verification \(not in"
    ):
        reg.load(NAME)


def test_removed_file_is_refused(reg: Registry, tmp_path: Path) -> None:
    _register(reg)
    (_version_dir(tmp_path, 1) / "preprocessing.json").unlink()

    with pytest.raises(
        RegistryError, match=r"preprocessing.json failed verification .in the manifest"
    ):
        reg.load(NAME)


def test_read_document_names_the_missing_document(reg: Registry) -> None:
    mv = _register(reg)
    with pytest.raises(
        RegistryError, match=r"digits-mlp:1 has no document 'eval.json'; documents: "
    ):
        reg.read_document(mv, "eval.json")


# ---- concurrency and failures ------------------------------------------------------------------


def test_concurrent_registrations_get_distinct_versions(reg: Registry, tmp_path: Path) -> None:
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        barrier.wait()
        try:
            results.append(_register(reg, seed=seed).version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sorted(results) == list(range(1, 9))
    assert [mv.version for mv in reg.versions(NAME)] == list(range(1, 9))
    for version in range(1, 9):
        assert reg.load(f"{NAME}:{version}").manifest["version"] == version
    assert _leftovers(tmp_path) == []


def test_failure_mid_register_leaves_nothing(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = store_module._write_bytes

    def failing_write(fs, path: str, data: bytes) -> None:
        if path.endswith("metrics.json"):
            raise RuntimeError("disk on fire")
        real_write(fs, path, data)

    monkeypatch.setattr(store_module, "_write_bytes", failing_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _register(reg)

    assert reg.names() == []
    with pytest.raises(RegistryError, match="unknown model 'digits-mlp'"):
        reg.resolve(NAME)
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(store_module, "_write_bytes", real_write)
    assert _register(reg).version == 1


def test_failed_rename_becomes_a_registry_error_and_cleans_up(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(reg)

    def no_rename(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(store_module.os, "rename", no_rename)
    with pytest.raises(RegistryError, match=r"could not register digits-mlp in .*Permission"):
        _register(reg)
    monkeypatch.undo()

    assert [mv.version for mv in reg.versions(NAME)] == [1]
    assert _leftovers(tmp_path) == []


# ---- roots -------------------------------------------------------------------------------------


def test_file_uri_root(tmp_path: Path) -> None:
    root = (tmp_path / "uri-registry").as_uri()
    reg = Registry(root)
    mv = _register(reg)
    reg.promote(NAME, "production")

    assert root.startswith("file:///")
    assert mv.uri == f"{root}/{NAME}/1"
    assert (tmp_path / "uri-registry" / NAME / "1" / "manifest.json").is_file()
    assert torch.equal(
        Registry(root).load("digits-mlp@production").tensors["fc.bias"], torch.zeros(4)
    )


@pytest.mark.parametrize("kind", ["mock", "subtree"])
def test_object_store_code_path(kind: str, tmp_path: Path) -> None:
    # Neither filesystem is a LocalFileSystem, so files are moved one by one, manifest last.
    if kind == "mock":
        fs = pafs._MockFileSystem()
    else:
        (tmp_path / "bucket").mkdir()
        fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    reg = Registry("models", filesystem=fs)

    assert [_register(reg, seed=i).version for i in range(2)] == [1, 2]
    reg.promote("digits-mlp:1", "production")
    assert reg.load("digits-mlp@production").version.uri == "models/digits-mlp/1"
    assert reg.load(NAME).documents["metrics.json"] == {"val_accuracy": 0.9}
    leftovers = fs.get_file_info(pafs.FileSelector("models/digits-mlp"))
    assert sorted(i.base_name for i in leftovers) == ["1", "2", "aliases.json"]


def test_unopenable_uri_root_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="registry root 'nosuchscheme://x' cannot be opened"):
        Registry("nosuchscheme://x")


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "-lead", "has space", "a/b", "x" * 65, "a:b", "a@b"])
def test_bad_model_names_are_refused(reg: Registry, name: str) -> None:
    with pytest.raises(RegistryError, match=f"invalid model name {re.escape(repr(name))}"):
        _register(reg, name=name)


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("", "expected NAME, NAME:VERSION or NAME@ALIAS"),
        ("digits-mlp:", "version '' is not a positive integer"),
        ("digits-mlp:0", "version '0' is not a positive integer"),
        ("digits-mlp:v2", "version 'v2' is not a positive integer"),
        ("digits-mlp@", "bad alias ''"),
        ("digits-mlp@prod:1", "bad alias 'prod:1'"),
        ("bad name:1", "bad name 'bad name'"),
    ],
)
def test_malformed_refs_name_the_problem(reg: Registry, ref: str, problem: str) -> None:
    _register(reg)
    pattern = f"malformed model ref {re.escape(repr(ref))}.*{re.escape(problem)}"
    with pytest.raises(RegistryError, match=pattern):
        reg.resolve(ref)


def test_unknown_model_lists_the_known_ones(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="has no models yet"):
        reg.resolve("mnist")
    _register(reg)
    _register(reg, name="iris-tree")
    with pytest.raises(
        RegistryError, match=r"unknown model 'mnist'.*known models: digits-mlp, iris-tree"
    ):
        reg.load("mnist:1")


@pytest.mark.parametrize(
    ("documents", "extra", "problem"),
    [
        ({"notes.txt": {}}, None, "document name 'notes.txt' must be a plain file name ending in"),
        ({"manifest.json": {}}, None, "document name 'manifest.json'"),
        ({"../up.json": {}}, None, r"document name '../up.json'"),
        ({"model.json": [1, 2]}, None, "document model.json must be a dict"),
        ({"model.json": {"f": object()}}, None, "document model.json cannot be written as JSON"),
        ({}, {"config.json": b"{}"}, "extra file name 'config.json'"),
        ({}, {"model.safetensors": b""}, "extra file name 'model.safetensors'"),
    ],
)
def test_bad_documents_and_files_are_refused(
    reg: Registry, tmp_path: Path, documents: dict, extra: dict | None, problem: str
) -> None:
    with pytest.raises(RegistryError, match=f"cannot register digits-mlp: {problem}"):
        reg.register(NAME, _tensors(), documents, extra_files=extra)
    assert not (tmp_path / "registry").exists() or reg.names() == []


def test_non_tensor_value_is_refused(reg: Registry) -> None:
    with pytest.raises(RegistryError, match=r"tensor 'w' is a list, not a torch.Tensor"):
        reg.register(NAME, {"w": [1.0]}, {})  # type: ignore[dict-item]


# ---- lineage helpers ---------------------------------------------------------------------------


def test_data_fingerprint_ignores_order_and_sees_changes() -> None:
    files = [("a.parquet", 10, 1.5), ("b.parquet", 20, 2.5)]
    base = data_fingerprint(files)

    assert base == data_fingerprint(list(reversed(files)))
    assert len(base) == 64
    assert base != data_fingerprint([("a.parquet", 11, 1.5), ("b.parquet", 20, 2.5)])
    assert base != data_fingerprint([("a.parquet", 10, 1.6), ("b.parquet", 20, 2.5)])
    assert base != data_fingerprint(files[:1])


def test_environment_outside_git_has_no_commit(tmp_path: Path) -> None:
    env = environment(cwd=str(tmp_path))
    assert env["git_commit"] is None and env["git_dirty"] is None
    assert env["kiln"] == kiln.__version__
    assert env["hostname"] == socket.gethostname()
