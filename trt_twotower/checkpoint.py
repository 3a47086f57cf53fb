"""Checkpoint directories in the released layout: ``config.json``, ``model.safetensors`` or
``model.safetensors.index.json`` + shards, and the tokenizer.

Tensors are read one at a time from memory-mapped safetensors files, so a 120 GB checkpoint
never has to fit in RAM: a tower is read while the other stays on disk. Pickle files are
refused (they can run code). Every problem names the tensor or file it is about.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import TwoTowerConfig
from .errors import TwoTowerError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-?????-of-?????.safetensors"  # the shard names write_checkpoint gives
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The remote code renames ``embedding.`` to ``embeddings.`` on load (spec §3): accept both.
ALIASES = {".embeddings.weight": ".embedding.weight"}
DIGEST_SAMPLES, DIGEST_WINDOW = 16, 64 * 1024


class CheckpointError(TwoTowerError, ValueError):
    """A checkpoint directory that cannot be read as a TwoTower checkpoint."""


def _check_header(path: Path) -> dict:
    """Parse a safetensors header and check the file holds all the bytes it declares: a
    truncated file would otherwise fail deep inside safetensors, or not at all until read."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            raw = f.read(length) if length <= size - 8 else None
    except struct.error as err:
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header: {err})") \
            from err
    if raw is None:
        raise CheckpointError(f"{path} is truncated or corrupt: its header claims "
                              f"{length} bytes but the file has {size}")
    try:
        header = json.loads(raw)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes_ok = all(isinstance(v["dtype"], str) and isinstance(v["shape"], list)
                        for v in tensors.values())
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError,
            IndexError) as err:
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header: "
                              f"{err!r}); download or convert it again") from err
    if not shapes_ok:
        raise CheckpointError(f"{path} has a tensor entry without dtype or shape; "
                              "download or convert it again")
    if 8 + length + end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {8 + length + end} bytes "
                              f"but the file has {size}; download it again")
    return header


class CheckpointReader:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory")
        self.config = TwoTowerConfig.load(self.directory)
        self._files = self._locate()
        self._headers = {f: _check_header(f) for f in set(self._files.values())}
        for name, path in sorted(self._files.items()):
            if name not in self._headers[path]:
                raise CheckpointError(f"{self.directory / INDEX_FILE} puts tensor {name!r} in "
                                      f"{path.name}, which does not hold it; fix the index")

    def _locate(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} has no valid weight_map: {err}") from err
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard "
                                      "file names")
            files = {name: self.directory / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index} lists shard {shard.name}, which is missing")
            return files
        if single.is_file():
            return {name: single for name in _check_header(single) if name != "__metadata__"}
        pickles = sorted(p.name for p in self.directory.iterdir()
                         if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.directory} holds only pickle weights ({', '.join(pickles)}); pickle "
                "files can run code when loaded and are refused: convert them to safetensors")
        raise CheckpointError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def names(self) -> list[str]:
        return sorted(self._files)

    def _resolve(self, name: str) -> str:
        if name in self._files:
            return name
        for canonical, alias in ALIASES.items():
            if name.endswith(canonical):
                other = name[: -len(canonical)] + alias
                if other in self._files:
                    return other
        raise CheckpointError(f"tensor {name!r} is missing from {self.directory}")

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._resolve(name)
        return tuple(self._headers[self._files[stored]][stored]["shape"])

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One tensor, read from its memory-mapped file."""
        stored = self._resolve(name)
        path = self._files[stored]
        try:
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(stored)
        except SafetensorError as err:
            raise CheckpointError(f"cannot read tensor {stored!r} from {path}: {err}; "
                                  "download or convert the file again") from err
        return tensor if dtype is None else tensor.to(dtype)

    def read_tower(self, prefixes: Sequence[str], expected: Mapping[str, tuple[int, ...]],
                   dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu"
                   ) -> dict[str, torch.Tensor]:
        """Exactly the ``expected`` tensors under ``prefixes`` (see ``check_tower``)."""
        self.check_tower(prefixes, expected)
        return {name: self.read(name, dtype).to(device) for name in expected}

    def check_tower(self, prefixes: Sequence[str], expected: Mapping[str, tuple[int, ...]]
                    ) -> None:
        """Refuse, from the headers alone, a checkpoint whose tensors under ``prefixes`` are
        not exactly ``expected``: any missing, unexpected or mis-shaped tensor is an error
        that lists them by name, where reading them one by one would broadcast a wrong shape
        into a wrong model."""
        present = {n for n in self._files if n.startswith(tuple(prefixes))}
        canonical = {self._canonical(n) for n in present}
        missing = sorted(set(expected) - canonical)
        unexpected = sorted(canonical - set(expected))
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing[:10])}"
                            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}"
                            + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
        for name in sorted(set(expected) & canonical):
            found = self.shape(name)
            if found != tuple(expected[name]):
                problems.append(f"{name} has shape {list(found)}, expected {list(expected[name])}")
        if problems:
            raise CheckpointError(f"{self.directory} does not match its config: "
                                  + "; ".join(problems))

    @staticmethod
    def _canonical(name: str) -> str:
        for canonical, alias in ALIASES.items():
            if name.endswith(alias):
                return name[: -len(alias)] + canonical
        return name

    def digest(self) -> str:
        """sha256 over config.json, the index and each weight file's name, size, header and
        a sample of its data (DIGEST_SAMPLES windows of DIGEST_WINDOW bytes, evenly spaced):
        cheap even for 120 GB (1 MiB read per shard), and it changes whenever a tensor is
        added, re-shaped or re-trained. Headers alone would give two checkpoints of the same
        architecture the same digest."""
        h = hashlib.sha256((self.directory / "config.json").read_bytes())
        index = self.directory / INDEX_FILE
        if index.is_file():
            h.update(index.read_bytes())
        for path in sorted(set(self._files.values())):
            size = path.stat().st_size
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                h.update(path.name.encode() + str(size).encode() + f.read(length))
                step = max(size - 8 - length - DIGEST_WINDOW, 0) // (DIGEST_SAMPLES - 1)
                for i in range(DIGEST_SAMPLES):
                    f.seek(8 + length + i * step)
                    h.update(f.read(DIGEST_WINDOW))
        return h.hexdigest()

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        return self.directory if (self.directory / "tokenizer.json").is_file() else None


def write_checkpoint(directory: str | Path, config: TwoTowerConfig,
                     tensors: Mapping[str, torch.Tensor],
                     max_shard_bytes: Optional[int] = None) -> Path:
    """config.json + model.safetensors, or HF-style shards and an index past max_shard_bytes.
    The weights of an earlier write to the same directory are removed first: a stale index
    would win over a new single file, and stale shards would be read as current."""
    directory = Path(directory)
    tensors = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path in (directory / SINGLE_FILE, directory / INDEX_FILE,
                     *directory.glob(SHARD_PATTERN)):
            path.unlink(missing_ok=True)
        config.save(directory)
        _write_weights(directory, tensors, max_shard_bytes)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot write a checkpoint to {directory}: "
                              f"{getattr(err, 'strerror', None) or err}") from err
    return directory


def _write_weights(directory: Path, tensors: Mapping[str, torch.Tensor],
                   max_shard_bytes: Optional[int]) -> None:
    """One file, or shards of at most max_shard_bytes and the index that maps each tensor to
    its shard (the released checkpoint's layout)."""
    shards = list(_shards(tensors, max_shard_bytes))
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2) + "\n")


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: Optional[int]
            ) -> Iterable[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shard and max_bytes is not None and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensors[name]
        size += nbytes
    yield shard
