"""The model folder (app.modelfolder) alone: the content hash, staging and finishing a folder; and the one
``library_versions`` (app.provenance)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from app import modelfolder
from app.provenance import library_versions


def _reference_hash(folder: Path) -> str:
    """The model hash as the engine computed it before the model folder had a module of its own (records and the
    embedded model's card quote such hashes, so the value must never change)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in modelfolder.WEIGHT_SUFFIXES):
        if f.name == modelfolder.MANIFEST:
            continue
        h.update(f"{f.relative_to(folder).as_posix()}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _folder(root: Path) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 5000)  # > 1 MiB chunk
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (root / "model_index.json").write_text("{}")
    return root


def test_model_hash_is_unchanged_and_ignores_the_manifest_and_docs(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m")
    digest = modelfolder.model_hash(folder)
    assert digest == _reference_hash(folder) and len(digest) == 64
    (folder / modelfolder.MANIFEST).write_text('{"name": "x"}')
    (folder / "MODEL_CARD.md").write_text("# card")
    assert modelfolder.model_hash(folder) == digest  # neither the manifest nor docs name the model
    assert modelfolder.model_hash(str(folder)) == digest  # a str path as well
    moved = folder.rename(tmp_path / "elsewhere")
    assert modelfolder.model_hash(moved) == digest  # independent of where the folder lies
    (moved / "unet" / "config.json").write_text('{"sample_size": 16}')
    assert modelfolder.model_hash(moved) != digest


def test_finish_model_folder_writes_the_manifest_with_its_hash_and_replaces_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    leftover = tmp_path / "model.partial"
    leftover.mkdir()
    (leftover / "half-written.bin").write_bytes(b"x")
    staging = modelfolder.staging_folder(out)
    assert staging == leftover and not staging.exists()  # an interrupted write's leftover is removed
    _folder(staging)
    expected = modelfolder.model_hash(staging)
    digest = modelfolder.finish_model_folder(staging, out, {"name": "model", "model_hash": "old", "b": 1})
    assert digest == expected and not staging.exists() and not (out / "stale.json").exists()
    text = (out / modelfolder.MANIFEST).read_text()
    assert text == json.dumps({"name": "model", "model_hash": digest, "b": 1}, indent=2)
    assert modelfolder.read_manifest(out)["model_hash"] == modelfolder.model_hash(out) == digest


def test_read_manifest_is_empty_without_one(tmp_path: Path) -> None:
    assert modelfolder.read_manifest(tmp_path) == {}


def test_the_loaded_model_is_described_by_its_folder(tiny_engine) -> None:
    folder = Path(tiny_engine.info.path)
    assert tiny_engine.info.model_hash == modelfolder.model_hash(folder)
    assert modelfolder.read_manifest(folder)["model_hash"] == tiny_engine.info.model_hash
    assert set(modelfolder.check_model_folder(folder)) >= {"unet", "vae", "scheduler", "tokenizer", "text_encoder"}


def test_library_versions_is_one_list_for_runs_models_and_evaluations() -> None:
    versions = library_versions()
    # the run records' keys, in their order (the training manifests' five come first)
    assert list(versions) == ["python", "torch", "diffusers", "transformers", "numpy", "pillow", "pydicom"]
    assert all(isinstance(v, str) and v for v in versions.values())


def test_one_library_versions_and_one_prompt_encoder() -> None:
    from app import engine, provenance
    from app.train import common

    assert engine.library_versions is provenance.library_versions  # what CounterfactualResult.record() writes
    assert not hasattr(common, "library_versions") and not hasattr(engine, "encode_prompt_embeddings")
