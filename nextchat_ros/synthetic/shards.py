"""Scenes rendered once to files, so that training reads slow renderers' scenes
instead of drawing them again for every item.

A pool is a directory of shards, each a few hundred consecutive seeds of one
renderer and split: ``images.npy`` (memory-mapped), ``depth.npy`` (float16, metres),
``masks.npy`` (every listed object's visible mask as packed bits) and
``scenes.json`` (objects, camera, counts). A scene read back equals the one the
renderer draws for its seed, except that depth is float16 and the amodal masks are
not kept. Scenes are pure functions of their seeds, so a pool is a cache: deleting
it changes nothing but time.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

from .scenes import Scene, SceneObject

SHARD_SIZE = 250
FORMAT = 1


def _shard_dir(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}"


def _write_shard(job: tuple) -> int:
    render, root, first, count, height, width, index = job
    out = _shard_dir(Path(root), index)
    if (out / "scenes.json").is_file():
        return count
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(count, height, width, 3))
    depth = np.lib.format.open_memmap(tmp / "depth.npy", mode="w+", dtype=np.float16, shape=(count, height, width))
    masks, records = [], []
    for k in range(count):
        scene = render(first + k, height=height, width=width)
        images[k], depth[k] = scene.image, scene.depth
        objects = []
        for obj in scene.objects:
            objects.append({"kind": obj.kind, "color": obj.color, "size": obj.size, "box": obj.box.tolist(),
                            "visible_fraction": obj.visible_fraction, "depth_m": obj.depth_m, "mask": len(masks)})
            masks.append(np.packbits(obj.mask.reshape(-1)))
        records.append({"seed": first + k, "objects": objects, "camera": scene.camera, "hidden": scene.hidden,
                        "background": scene.background})
    images.flush()
    depth.flush()
    del images, depth
    np.save(tmp / "masks.npy", np.stack(masks) if masks else np.zeros((0, (height * width + 7) // 8), np.uint8))
    (tmp / "scenes.json").write_text(json.dumps({"format": FORMAT, "height": height, "width": width,
                                                 "scenes": records}))
    with contextlib.suppress(OSError):  # another process finished the same shard first
        tmp.rename(out)
    return count


class ScenePool:
    """``count`` scenes of ``renderer`` from seed ``first`` on, rendered to ``root``
    on first use (``processes`` at a time) and read back by position."""

    def __init__(self, root: str | Path, render, first: int, count: int, height: int = 240, width: int = 320):
        self.root, self.render, self.first, self.count = Path(root), render, first, count
        self.height, self.width = height, width
        self._open: dict[int, tuple] = {}

    def _jobs(self) -> list[tuple]:
        return [(self.render, str(self.root), self.first + i, min(SHARD_SIZE, self.count - i), self.height,
                 self.width, i // SHARD_SIZE) for i in range(0, self.count, SHARD_SIZE)]

    def missing(self) -> int:
        """How many scenes still have to be rendered."""
        return sum(job[3] for job in self._jobs() if not (_shard_dir(self.root, job[6]) / "scenes.json").is_file())

    def build(self, processes: int | None = None, progress: bool = True) -> None:
        """Render the shards that are not there yet."""
        jobs = [j for j in self._jobs() if not (_shard_dir(self.root, j[6]) / "scenes.json").is_file()]
        if not jobs:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(j[3] for j in jobs), desc=f"rendering {self.root.name}", unit="scene")
        if processes == 1:
            done = map(_write_shard, jobs)
        else:
            pool = multiprocessing.get_context("spawn").Pool(processes)
            done = pool.imap_unordered(_write_shard, jobs)
        try:
            for count in done:
                if bar is not None:
                    bar.update(count)
        finally:
            if processes > 1:
                pool.close()
                pool.join()
            if bar is not None:
                bar.close()

    def _shard(self, index: int) -> tuple:
        if index not in self._open:
            path = _shard_dir(self.root, index)
            meta = json.loads((path / "scenes.json").read_text())
            if meta.get("format") != FORMAT or (meta["height"], meta["width"]) != (self.height, self.width):
                raise ValueError(f"{path} holds scenes of another format or size; delete it to render it again")
            self._open[index] = (np.load(path / "images.npy", mmap_mode="r"),
                                 np.load(path / "depth.npy", mmap_mode="r"),
                                 np.load(path / "masks.npy", mmap_mode="r"), meta["scenes"])
        return self._open[index]

    def scene(self, position: int) -> Scene:
        """The pool's scene ``position`` (seed ``first + position``); rendered on the
        spot when its shard is not built."""
        if not 0 <= position < self.count:
            raise IndexError(f"scene {position} of a pool of {self.count}")
        index = position // SHARD_SIZE
        if not (_shard_dir(self.root, index) / "scenes.json").is_file():
            return self.render(self.first + position, height=self.height, width=self.width)
        images, depth, masks, records = self._shard(index)
        k = position - index * SHARD_SIZE
        record = records[k]
        pixels = self.height * self.width
        objects = [SceneObject(o["kind"], o["color"], o["size"], np.array(o["box"], np.float64),
                               np.unpackbits(masks[o["mask"]])[:pixels].reshape(self.height, self.width).astype(bool),
                               o["visible_fraction"], o["depth_m"]) for o in record["objects"]]
        return Scene(seed=record["seed"], image=np.array(images[k]), objects=objects,
                     depth=np.asarray(depth[k], np.float32), background=record["background"],
                     camera=record["camera"], hidden=record["hidden"])
