"""The driver's feature cache, sent through Ray's object store to a node that lacks it (a cluster
without a shared disk). Chosen by measurement over each node building its own copy: seconds
against minutes, and no backbone in the trial's memory (bench/results/cluster_cache.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmsa.features.cache import write_folder_atomically
from mmsa.locks import exclusive


def offer(folders: list[str]) -> dict:
    """Every file of these cache folders, put once into the object store: {"folder/file": ref}.
    Memory-mapped, so the driver's own memory holds no copy."""
    import ray
    files = {}
    for folder in map(Path, folders):
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
            files[f"{folder.name}/{path.name}"] = ray.put(raw)
    return files


def receive(files: dict, root: Path, names: list[str]) -> None:
    """Write the offered folders `names` under `root` where missing. Once per node: concurrent
    trials (and a cache build, mmsa.features.cache) take turns on `root`'s lock, and each folder appears
    whole or not at all."""
    import ray
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root):
        for name in names:
            if (root / name / "meta.json").exists():
                continue

            def fill(tmp: Path, name: str = name) -> None:
                for key, ref in files.items():
                    folder, file = key.split("/", 1)
                    if folder == name:
                        ray.get(ref).tofile(tmp / file)
            write_folder_atomically(root / name, fill)
