"""Turning (scene, sample) pairs into model inputs: a torch Dataset over the
synthetic stream, and the collate function that pads them into a TrainingBatch."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from nextchat_ros.images import pixels_to_normalized
from nextchat_ros.model.config import NextChatConfig
from nextchat_ros.model.prompt import PromptBuilder, pack_turns
from nextchat_ros.model.sam import preprocess_image as sam_preprocess
from nextchat_ros.model.sam import target_masks
from nextchat_ros.model.vision import preprocess_image as vision_preprocess
from nextchat_ros.synthetic.samples import SyntheticTabletop

from .objective import TrainingBatch, collate


def object_patch_targets(scene, config: NextChatConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each listed object's share of each image patch (K, g*g; the fraction of the
    patch its visible mask covers), its colour (K,) and its kind (K,), labels
    counted from 1 (0 is 'no object'), on the square-padded image the vision
    tower sees."""
    from nextchat_ros.images import square_padding
    from nextchat_ros.synthetic.scenes import COLORS, KINDS

    h, w = scene.image.shape[:2]
    side, left, top = square_padding(h, w)
    grid = config.vision.image_size // config.vision.patch_size
    masks = np.zeros((len(scene.objects), side, side), np.float32)
    for k, o in enumerate(scene.objects):
        masks[k, top:top + h, left:left + w] = o.mask
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(masks), grid).flatten(1)
    colors = torch.tensor([list(COLORS).index(o.color) + 1 for o in scene.objects], dtype=torch.long)
    kinds = torch.tensor([KINDS.index(o.kind) + 1 for o in scene.objects], dtype=torch.long)
    return cover, colors, kinds


def encode_item(image: np.ndarray, turns: list[tuple], prompt: PromptBuilder, config: NextChatConfig,
                with_masks: bool) -> dict:
    """Model inputs of one image and its turns, each ``(question, answer, regions,
    answer_boxes, masks, looks)``: boxes in pixels of ``image``, ``masks`` one
    image-sized bool array per answer box, or None, ``looks`` (character offset in
    the question, box) pairs (prompt.PromptBuilder.training_example). Several turns
    are packed into one row (prompt.pack_turns)."""
    h, w = image.shape[:2]
    examples, all_masks = [], []
    for question, answer, regions, answer_boxes, masks, looks in turns:
        regions = [pixels_to_normalized(b, h, w) for b in regions]
        boxes = [pixels_to_normalized(b, h, w) for b in answer_boxes]
        look = [(end, pixels_to_normalized(b, h, w)) for end, b in looks]
        examples.append(prompt.training_example(question, answer, regions, boxes, look))
        all_masks += list(masks) if masks is not None else []
    example = examples[0] if len(examples) == 1 else pack_turns(examples, len(prompt.prefix()))
    pixels = torch.from_numpy(np.ascontiguousarray(image).copy())
    item = {"example": example, "vision_pixels": vision_preprocess(pixels, config.vision)}
    if with_masks:
        item["sam_pixels"] = sam_preprocess(pixels, config.sam)
        item["mask_targets"] = (target_masks(torch.from_numpy(np.stack(all_masks)), config.sam)[:, 0]
                                if all_masks else None)
    return item


class SyntheticItems(Dataset):
    """Item i of a split's synthetic stream, encoded for the model: scene i with
    ``turns_per_image`` samples about it, packed into one row when more than one."""

    def __init__(self, stream: SyntheticTabletop, prompt: PromptBuilder, config: NextChatConfig, with_masks: bool,
                 turns_per_image: int = 1, with_objects: bool = False, with_looks: bool = False):
        """``with_objects``: each item also carries its scene's object_patch_targets
        (for the image-token attribute loss). ``with_looks``: questions' anchor
        names are to look at their anchors (Sample.question_looks)."""
        self.stream, self.prompt, self.config, self.with_masks = stream, prompt, config, with_masks
        self.turns_per_image, self.with_objects, self.with_looks = turns_per_image, with_objects, with_looks

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict:
        scene, samples = self.stream.scene_samples(index, self.turns_per_image)
        turns = [(s.question, s.answer, s.regions, s.answer_boxes, [o.mask for o in s.answer_objects],
                  [(end, o.box) for end, o in s.question_looks] if self.with_looks else [])
                 for s in samples]
        item = encode_item(scene.image, turns, self.prompt, self.config, self.with_masks)
        if self.with_objects:
            item["objects"] = object_patch_targets(scene, self.config)
        return item


class RealItems(Dataset):
    """Samples read from real data files (formats.py), cycled epoch after epoch in
    an order that is a pure function of (seed, epoch)."""

    def __init__(self, samples: list, prompt: PromptBuilder, config: NextChatConfig, with_masks: bool,
                 seed: int = 0):
        if not samples:
            raise ValueError("no samples in the configured data files")
        self.samples, self.prompt, self.config, self.with_masks, self.seed = samples, prompt, config, with_masks, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict:
        epoch, position = divmod(index, len(self.samples))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        sample = self.samples[order[position]]
        image = sample.image()
        turn = (sample.question, sample.answer, sample.regions, sample.answer_boxes, sample.masks, [])
        return encode_item(image, [turn], self.prompt, self.config, self.with_masks)


class StreamSampler(Sampler):
    """The sample indices one rank reads, from sample ``start`` on: a resumed run
    continues exactly where it stopped.

    Each optimizer step takes ``batch_size * grad_accum * world`` consecutive samples,
    as ``grad_accum * world`` blocks of ``batch_size``; rank r's micro-batch m is block
    ``r * grad_accum + m``. So a run resumed on fewer ranks with a larger grad_accum
    (the same global batch) reads the same blocks, and averages the same gradients."""

    def __init__(self, start: int, rank: int = 0, world: int = 1, batch_size: int = 1, grad_accum: int = 1):
        self.start, self.rank, self.world = start, rank, world
        self.batch_size, self.grad_accum = batch_size, grad_accum

    def __iter__(self):
        per_step = self.batch_size * self.grad_accum * self.world
        step_start = self.start
        while True:
            for micro in range(self.grad_accum):
                block = step_start + (self.rank * self.grad_accum + micro) * self.batch_size
                yield from range(block, block + self.batch_size)
            step_start += per_step

    def __len__(self) -> int:
        return 2**62


class Collator:
    """Items -> (TrainingBatch, each row's object_patch_targets or None)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> TrainingBatch:
        vision = torch.stack([i["vision_pixels"] for i in items])
        sam = torch.stack([i["sam_pixels"] for i in items]) if "sam_pixels" in items[0] else None
        masks = [i["mask_targets"] for i in items] if "sam_pixels" in items[0] else None
        batch = collate([i["example"] for i in items], self.pad_id, vision, sam, masks)
        objects = [i["objects"] for i in items] if "objects" in items[0] else None
        return batch, objects
