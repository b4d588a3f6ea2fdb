"""Stage 1 of loading, the source: what the user gave -> an opened :class:`CheckpointSource`.

Takes a name (an embedded model such as ``"fastflow-tiny-digits"``, :func:`resolve_model`) or a path:
a single ``.safetensors`` file; a diffusers model folder (``diffusion_pytorch_model.safetensors`` or
a sharded ``*.safetensors.index.json``, plus ``config.json``); or a diffusers pipeline folder, from
which the component's subfolder (``transformer/``, ``unet/``, ``vae/``) is taken. Hands on every
file validated (headers only, no tensor data read), a key -> file map, the safetensors metadata and
the folder's ``config.json`` / ``model_index.json`` / scheduler facts (:mod:`.describe` reads them).
Every file an index or a symlink names must resolve inside the model folder (the Hugging Face
cache's ``blobs/`` folder of the same repository is accepted too, since its snapshots are symlinks
into it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, HeaderError, InputError, PickleRefusedError, UnsafePathError
from ..models import configs
from .files import read_json
from .safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, TensorEntry, refuse_unsafe_file

# The embedded default model (tools/train_tiny.py): what `fastflow generate` runs without --model.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "fastflow-tiny-digits"


def resolve_model(path: str | os.PathLike) -> Path:
    """A model's files: ``path`` itself, or for a bare name the embedded model of that name
    (``"fastflow-tiny-digits"``). A registered config's name that has no files here is an error
    saying what to pass instead."""
    given = Path(path).expanduser()
    name = str(path)
    if given.exists() or os.sep in name or "/" in name:
        return given
    embedded = DEFAULT_MODEL.parent / name
    if embedded.is_dir():
        return embedded
    if name in configs.list_models(include_tiny=True):
        raise InputError(
            f"{name!r} is a registered model config, not files on this machine (fastflow never downloads): "
            f"pass the path of its files (a diffusers folder or a transformer file), with variant={name!r} "
            "where the files cannot tell"
        )
    return given


@dataclass
class CheckpointSource:
    """All tensors of one checkpoint, possibly spread over shards."""

    path: Path  # what the user gave
    files: list[SafetensorsFile]
    key_file: dict[str, SafetensorsFile]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__ of all shards
    folder_config: dict = field(default_factory=dict)  # config.json of a diffusers model folder
    pipeline_class: str | None = None  # model_index.json _class_name, when there is one
    scheduler_config: dict = field(default_factory=dict)  # a pipeline folder's scheduler/scheduler_config.json

    def entry(self, key: str) -> TensorEntry:
        return self.key_file[key].entries[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.entries[k].shape for k, f in self.key_file.items()}

    def file_of(self, key: str) -> Path:
        return self.key_file[key].path

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for f in self.files for e in f.entries.values())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _hf_blobs(folder: Path) -> Path | None:
    """The Hugging Face cache's ``<repo>/blobs`` for a folder under ``<repo>/snapshots/<rev>/``,
    only when it is the real sibling of ``snapshots/`` (not itself a symlink leading elsewhere)."""
    real = Path(os.path.realpath(folder))
    for parent in [real, *real.parents]:
        if parent.parent.name == "snapshots":
            repo = parent.parent.parent
            blobs = repo / "blobs"
            if blobs.is_dir() and not blobs.is_symlink() and Path(os.path.realpath(blobs)) == blobs:
                return blobs
            return None
    return None


def allowed_roots(folder: Path) -> list[Path]:
    """Where files of the model at ``folder`` may live: the folder itself (resolved), and the
    cache's blobs/ when the folder is a snapshot of the Hugging Face cache."""
    roots = [Path(os.path.realpath(folder))]
    blobs = _hf_blobs(folder)
    return roots if blobs is None else [*roots, blobs]


def inside(folder: Path, candidate: Path, what: str) -> Path:
    """``candidate`` resolved, if it stays inside ``folder`` (or its cache blobs), else refuse."""
    real = Path(os.path.realpath(candidate))
    if not any(real == r or r in real.parents for r in allowed_roots(folder)):
        raise UnsafePathError(
            candidate,
            f"{what} resolves to {real}, outside the model folder {folder}",
            "refusing to read files outside the model folder: copy the weights into the folder "
            "or load the file directly by its own path",
        )
    return real


def folder_json(folder: Path, name: str) -> dict:
    """``folder/name`` parsed, after the path rule: {} when the file does not exist."""
    path = folder / name
    if not path.exists() and not path.is_symlink():
        return {}
    inside(folder, path, f"'{name}'")
    return read_json(path, name)


def _model_folder(folder: Path, component: str) -> tuple[Path, str | None]:
    """The folder holding the weights, and the pipeline class if ``folder`` is a pipeline folder."""
    if (folder / "model_index.json").exists():
        pipeline_class = folder_json(folder, "model_index.json").get("_class_name")
        if not isinstance(pipeline_class, (str, type(None))):
            raise HeaderError(
                folder / "model_index.json", "'_class_name' is not a string", "re-download model_index.json"
            )
        # the denoiser is transformer/ in FLUX and SD3 folders, unet/ in SDXL's
        names = ("transformer", "unet") if component == "transformer" else (component,)
        sub = next((folder / n for n in names if (folder / n).is_dir()), folder / component)
        if not sub.is_dir():
            raise CheckpointError(
                folder,
                f"this diffusers pipeline folder has no '{component}/' subfolder "
                f"(found: {', '.join(sorted(p.name for p in folder.iterdir())[:20])})",
                f"pass the folder that contains '{component}/', or the weights file itself",
            )
        inside(folder, sub, f"'{component}/'")
        return sub, pipeline_class
    if (folder / component).is_dir() and not list(folder.glob("*.safetensors*")):
        inside(folder, folder / component, f"'{component}/'")
        return folder / component, None
    return folder, None


def _folder_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(
            folder,
            f"several index files: {[p.name for p in indexes]}",
            "keep one *.safetensors.index.json per model folder",
        )
    if indexes:
        inside(folder, indexes[0], f"'{indexes[0].name}'")
        index = read_json(indexes[0], indexes[0].name)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HeaderError(indexes[0], "index has no 'weight_map'", "re-download the index file")
        bad = [v for v in weight_map.values() if not isinstance(v, str) or not v.endswith(".safetensors")]
        if bad:
            raise HeaderError(
                indexes[0],
                f"weight_map values must be .safetensors file names, found {str(bad[0])[:80]!r}",
                "re-download the index file",
            )
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise UnsafePathError(
                    indexes[0],
                    f"weight_map entry {name!r} leads outside the model folder",
                    "refusing to follow it: fix or re-download the index file",
                )
        files = [inside(folder, folder / name, f"index entry {name!r}") for name in names]
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise CheckpointError(
                indexes[0],
                f"shards named by the index are missing: {missing}",
                "download the missing shards into the folder",
            )
        return files, weight_map
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise PickleRefusedError(
                folder,
                f"only pickle weights found ({', '.join(pickles)})",
                "fastflow never loads pickles: get the .safetensors version of the model",
            )
        raise CheckpointError(
            folder,
            "no .safetensors weights in this folder",
            "pass a .safetensors file or a diffusers folder with safetensors weights",
        )
    return [inside(folder, p, f"'{p.name}'") for p in files], None


def open_checkpoint(path: str | os.PathLike, component: str = "transformer") -> CheckpointSource:
    """Open and validate every file of a checkpoint (headers only: no tensor data is read)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(path, "no such file or folder", "check the path")
    folder_config: dict = {}
    pipeline_class = None
    scheduler: dict = {}
    if path.is_dir():
        folder, pipeline_class = _model_folder(path, component)
        paths, weight_map = _folder_files(folder)
        folder_config = folder_json(folder, "config.json")
        if pipeline_class is not None and (path / "scheduler").is_dir():
            scheduler = folder_json(path / "scheduler", "scheduler_config.json")
    else:
        paths, weight_map = [path], None
    files = [SafetensorsFile(p) for p in paths]
    key_file: dict[str, SafetensorsFile] = {}
    metadata: dict[str, str] = {}
    for f in files:
        metadata.update(f.metadata)
        for key in f.entries:
            if key in key_file:
                raise CheckpointError(
                    f.path,
                    f"tensor {key!r} also appears in {key_file[key].path.name}",
                    "the shards overlap: re-download the model",
                )
            key_file[key] = f
    if weight_map is not None:
        wrong = [k for k, name in weight_map.items() if k not in key_file or key_file[k].path.name != Path(name).name]
        if wrong:
            raise CheckpointError(
                path,
                f"the index names {len(wrong)} tensor(s) not found in the shard it "
                f"points to (e.g. {sorted(wrong)[:3]})",
                "re-download the index and its shards",
            )
    return CheckpointSource(path, files, key_file, metadata, folder_config, pipeline_class, scheduler)


__all__ = [
    "DEFAULT_MODEL",
    "CheckpointSource",
    "allowed_roots",
    "folder_json",
    "inside",
    "open_checkpoint",
    "refuse_unsafe_file",
    "resolve_model",
]
