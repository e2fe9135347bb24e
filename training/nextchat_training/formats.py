"""Loaders for the real data a user brings, turned into the same Sample records
the synthetic stream makes (``phrase [k]`` answers, pixel boxes).

- Shikra / official NExT-Chat jsonl (one JSON object a line):
  REC ``{"img_path", "expression", "bbox"}`` -> "where is {expression}?" / "Answer: [0] .";
  REG (same fields) -> "describe [0]." / "{expression}";
  grounded captions (Flickr30k CWB) ``{"image_id" | "img_path", "sentence" with <ph_st>..<ph_ed>,
  "boxes", "boxes_seq"}`` -> each phrase followed by its box references;
  VQA ``{"img_path" | "image_path" | "image", "question", "answer" | "annotation": {"multiple_choice_answer"}}``.
- COCO instance annotations (``instances_*.json``) for the segmentation stage:
  polygons and uncompressed RLE decoded to masks with PIL / numpy (no pycocotools).
- Bags written by ``nextchat bag record`` (or any bag with nextchat_ros/msg/QueryTruth
  on its truth topic): each query with a reference answer, its regions, the truth's
  boxes and masks, about the frame it names (kept as the bag's bytes, decoded when
  read).

Nothing here unpickles anything: JSON in, numpy out. A malformed line is an
error naming the file and line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHRASE = re.compile(r"<ph_st>(.*?)<ph_ed>")


@dataclass
class RealSample:
    task: str
    image_path: Path | None  # None: the image is ``frame``
    question: str
    answer: str
    regions: list[list[float]]  # pixel xyxy, [k] in the question
    answer_boxes: list[list[float]]  # pixel xyxy, [k] in the answer
    masks: list[np.ndarray] | None = None
    frame: bytes | None = None  # a bag's sensor_msgs/Image (CDR), for samples read from a bag

    def image(self) -> np.ndarray:
        """The sample's RGB image."""
        if self.frame is not None:
            from nextchat_ros.bag.io import deserialize
            from nextchat_ros.bag.record import IMAGE_TYPE
            from nextchat_ros.ros_images import image_msg_to_rgb

            return image_msg_to_rgb(deserialize(self.frame, IMAGE_TYPE))
        with Image.open(self.image_path) as img:
            return np.asarray(img.convert("RGB"))


class FormatError(ValueError):
    pass


def _image_of(item: dict, image_root: Path) -> Path:
    for key in ("img_path", "image_path", "image", "file_name"):
        if key in item:
            return image_root / item[key]
    if "image_id" in item:
        return image_root / f"{item['image_id']}.jpg"
    raise KeyError("img_path")


def read_jsonl(path: str | Path, task: str, image_root: str | Path = ".") -> Iterator[RealSample]:
    """Samples of ``task`` (rec | reg | gc | vqa) from a Shikra / NExT-Chat jsonl file."""
    path, image_root = Path(path), Path(image_root)
    if task not in ("rec", "reg", "gc", "vqa"):
        raise ValueError(f"unknown jsonl task '{task}'; use rec, reg, gc or vqa")
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                yield _convert(item, task, image_root)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
                raise FormatError(f"{path}:{number}: not a valid {task} record ({type(exc).__name__}: {exc})") from None


def _convert(item: dict, task: str, image_root: Path) -> RealSample:
    image = _image_of(item, image_root)
    if task in ("rec", "reg"):
        expression = item["expression"] if "expression" in item else item["expressions"][0]
        box = [float(v) for v in item["bbox"]]
        if len(box) != 4:
            raise ValueError("bbox must have 4 numbers")
        if task == "rec":
            return RealSample("rec", image, f"where is {expression}?", "Answer: [0] .", [], [box])
        return RealSample("region_caption", image, "describe [0].", expression, [box], [])
    if task == "gc":
        boxes = [[float(v) for v in b] for b in item["boxes"]]
        seq = item["boxes_seq"]
        order: list[int] = []

        def replace(match: re.Match) -> str:
            refs = seq[replace.k]
            replace.k += 1
            start = len(order)
            order.extend(refs)
            return match.group(1) + "".join(f" [{start + j}]" for j in range(len(refs)))
        replace.k = 0
        sentence = PHRASE.sub(replace, item["sentence"])
        return RealSample("grounded_caption", image, "describe the image and ground every object.", sentence,
                          [], [boxes[i] for i in order])
    answer = item.get("answer")
    if answer is None:
        answer = item["annotation"]["multiple_choice_answer"]
    return RealSample("vqa", image, item["question"], str(answer), [], [])


def _polygon_mask(polygons, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 6:
            draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _rle_mask(rle: dict, height: int, width: int) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, str):
        raise ValueError("compressed RLE is not supported; convert to polygons or uncompressed RLE")
    flat = np.zeros(height * width, dtype=bool)
    pos, value = 0, False
    for run in counts:
        flat[pos:pos + run] = value
        pos += run
        value = not value
    return flat.reshape(width, height).T  # COCO RLE is column-major


def read_coco_instances(path: str | Path, image_root: str | Path = ".") -> Iterator[RealSample]:
    """One segmentation sample per annotated instance: "where is the {category}?" with its mask."""
    path, image_root = Path(path), Path(image_root)
    try:
        data = json.loads(Path(path).read_text())
        images = {img["id"]: img for img in data["images"]}
        categories = {c["id"]: c["name"] for c in data["categories"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FormatError(f"{path}: not a COCO instances file ({type(exc).__name__}: {exc})") from None
    for ann in annotations:
        try:
            img = images[ann["image_id"]]
            h, w = img["height"], img["width"]
            seg = ann["segmentation"]
            mask = _rle_mask(seg, h, w) if isinstance(seg, dict) else _polygon_mask(seg, h, w)
            x, y, bw, bh = ann["bbox"]
            name = categories[ann["category_id"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: annotation {ann.get('id')}: {type(exc).__name__}: {exc}") from None
        yield RealSample("rec", image_root / img["file_name"], f"where is the {name}?", "Answer: [0] .", [],
                         [[x, y, x + bw, y + bh]], [mask])


def read_bag(path: str | Path) -> list[RealSample]:
    """The training samples of a recorded bag: its queries that have a reference answer
    and whose frame is in the bag."""
    from nextchat_ros.bag.replay import read_queries

    samples = []
    for record in read_queries(path):
        truth = record.truth
        if truth is None or not truth.answer or record.frame is None:
            continue
        masks = [np.asarray(m, bool) for m in truth.masks] if truth.masks else None
        regions = [[float(v) for v in r] for r in record.regions]
        boxes = [[float(v) for v in b] for b in truth.boxes]
        samples.append(RealSample(truth.task, None, record.text, truth.answer, regions, boxes, masks, record.frame))
    if not samples:
        raise ValueError(f"{path}: no query with a reference answer and its frame")
    return samples
