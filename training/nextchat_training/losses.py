"""Losses of NExT-Chat (pixel2emb).

Every function returns the mean over the items it is given (never silently
dropping any), so a batch's loss does not depend on how it was split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from nextchat_ros.model.heads import BoxDecoder


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy over every labelled position of every sample."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if (shift_labels != ignore_index).sum() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


def box_loss(pred_raw: torch.Tensor, target: torch.Tensor, l1_weight: float, giou_weight: float) -> torch.Tensor:
    """``l1_weight * L1 + giou_weight * GIoU`` over (N, 4) normalised xyxy boxes.

    L1 uses the decoder's raw output (gradient everywhere); GIoU uses the
    clamped, corner-ordered box that inference reports.
    """
    if pred_raw.numel() == 0:
        return pred_raw.sum() * 0.0
    l1 = F.l1_loss(pred_raw, target, reduction="none").sum(-1).mean()
    giou = generalized_box_iou_loss(BoxDecoder.to_valid_box(pred_raw), target, reduction="mean")
    return l1_weight * l1 + giou_weight * giou


def cycle_loss(hidden: torch.Tensor, boxes: torch.Tensor, box_decoder, box_encoder) -> torch.Tensor:
    """Both directions of the cycle: MSE(enc(dec(h)), h) + L1(dec(enc(b)), b).

    ``h`` is the trigger's hidden state, taken as a fixed target (detached): the
    cycle term trains the two heads to invert each other without pulling the
    LLM's hidden states towards the heads.
    """
    if hidden.numel() == 0:
        return hidden.sum() * 0.0
    target_h = hidden.detach()
    h_cycle = F.mse_loss(box_encoder(box_decoder(target_h)).float(), target_h.float())
    b_cycle = F.l1_loss(box_decoder(box_encoder(boxes)).float(), boxes.float(), reduction="none").sum(-1).mean()
    return h_cycle + b_cycle


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - Dice, per mask, mean over masks. logits/targets: (N, ...)."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels, then over masks (SAM's convention)."""
    per_pixel = sigmoid_focal_loss(logits.flatten(1), targets.flatten(1), alpha=alpha, gamma=gamma, reduction="none")
    return per_pixel.mean(-1).mean()


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of each thresholded predicted mask with its target, (N,)."""
    pred = (logits > threshold).flatten(1).float()
    targets = targets.flatten(1)
    inter = (pred * targets).sum(-1)
    union = pred.sum(-1) + targets.sum(-1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor,
    focal_weight: float, dice_weight: float, iou_weight: float,
) -> torch.Tensor:
    """``focal_weight * focal + dice_weight * dice + iou_weight * MSE(iou_pred, IoU)``."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    logits = logits.float()
    actual_iou = mask_iou(logits.detach(), targets)
    return (focal_weight * focal_loss(logits, targets)
            + dice_weight * dice_loss(logits, targets)
            + iou_weight * F.mse_loss(iou_pred.float().view(-1), actual_iou))


__all__ = ["box_iou", "box_loss", "cycle_loss", "dice_loss", "focal_loss", "lm_loss", "mask_iou", "mask_loss"]
