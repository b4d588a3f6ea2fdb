"""LoRAs a request may use: names registered at start (``--lora NAME=PATH``), or relative paths
under ``--lora-dir``; no other path from a request reaches the file system. Paths are checked on
the event loop (absolute paths, ``..`` and anything that resolves outside the folder, symlinks
included, are refused); the worker loads a LoRA the first time a call needs it, unfused, and sets
every loaded LoRA's scale per call (unused ones at 0): switching needs no recompile."""

from __future__ import annotations

import collections
import threading
from pathlib import Path, PurePosixPath

from ..errors import InputError
from .protocol import ApiError, bad

DIR_PREFIX = "dir:"  # adapter names of LoRAs from --lora-dir (registered names cannot contain ':')
MAX_DIR_LORAS = 16  # LoRAs from --lora-dir kept loaded; the least recently used goes first


class LoraRegistry:
    def __init__(self, registered: dict[str, str], lora_dir: str | None):
        self.registered = {name: Path(path) for name, path in registered.items()}
        for name in self.registered:
            if ":" in name:
                raise InputError(f"LoRA name {name!r}: a name cannot contain ':'")
        self.root = Path(lora_dir).resolve() if lora_dir is not None else None
        self._dir_loaded: collections.OrderedDict[str, Path] = collections.OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self.registered)

    def resolve(self, entry: dict) -> str:
        """A request's ``{"name"}`` or ``{"path"}`` -> the adapter name (400 / 404)."""
        if "name" in entry:
            name = entry["name"]
            if not isinstance(name, str):
                raise bad("loras name must be a string")
            if name not in self.registered:
                known = ", ".join(self.names()) or "none are registered (fastflow serve --lora NAME=PATH)"
                raise ApiError(404, f"no LoRA named {name!r}; registered: {known}"[:500], "lora_not_found")
            return name
        return DIR_PREFIX + self.relative(entry["path"]).as_posix()

    def relative(self, path) -> PurePosixPath:
        """A request's LoRA path: relative, no '..', a .safetensors file inside --lora-dir after
        resolving every symlink."""
        if self.root is None:
            raise bad("LoRA paths are off: this server has no --lora-dir (use a registered name)", "lora_path_refused")
        if not isinstance(path, str) or not path or len(path) > 500 or "\x00" in path or "\\" in path:
            raise bad("loras path must be a relative path under the server's LoRA folder", "lora_path_refused")
        rel = PurePosixPath(path)
        if rel.is_absolute() or path.startswith("~") or any(part in ("..", "") for part in path.split("/")):
            raise bad(f"loras path {path!r}: only relative paths without '..' are allowed"[:300], "lora_path_refused")
        if rel.suffix != ".safetensors":
            raise bad(f"loras path {path!r}: a LoRA is a .safetensors file"[:300], "lora_path_refused")
        full = (self.root / rel).resolve()
        if not full.is_relative_to(self.root):
            raise bad(f"loras path {path!r} leads outside the LoRA folder"[:300], "lora_path_refused")
        if not full.is_file():
            raise ApiError(404, f"no LoRA file {path!r} in the server's LoRA folder"[:300], "lora_not_found")
        return rel

    def path_of(self, name: str) -> Path:
        if name.startswith(DIR_PREFIX):
            rel = self.relative(name[len(DIR_PREFIX) :])  # checked again: the folder may have changed
            return self.root / rel
        return self.registered[name]

    # --- the worker's side -----------------------------------------------------------------------
    def load_registered(self, pipe) -> None:
        for name, path in self.registered.items():
            _load(pipe, path, name)

    def apply(self, pipe, scales: dict[str, float]) -> None:
        """Loads what ``scales`` names and is not loaded yet, then sets every LoRA's scale."""
        for name in scales:
            if name not in pipe.loras:
                if name.startswith(DIR_PREFIX):
                    self._make_room(pipe, scales)
                _load(pipe, self.path_of(name), name)
            if name.startswith(DIR_PREFIX):
                self._dir_loaded[name] = True
                self._dir_loaded.move_to_end(name)
        if pipe.loras:
            pipe.set_lora_scales({name: scales.get(name, 0.0) for name in pipe.loras})

    def _make_room(self, pipe, keep) -> None:
        while len(self._dir_loaded) >= MAX_DIR_LORAS:
            old = next((n for n in self._dir_loaded if n not in keep), None)
            if old is None:
                return
            del self._dir_loaded[old]
            if old in pipe.loras:
                pipe.unload_lora(old)


def _load(pipe, path: Path, name: str) -> None:
    """Unfused; a LoRA that would change the model itself (FLUX.1 Canny / Depth) is refused."""
    pipe.load_lora(str(path), scale=0.0, name=name)
    if getattr(pipe, "_before_control", None) is not None:
        pipe.unload_lora(name)
        raise InputError(f"{path.name} is a FLUX.1 Canny / Depth LoRA (it changes the model): not servable")
