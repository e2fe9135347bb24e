"""Each loss against a value computed by hand, and the cycle property."""

import math

import pytest
import torch
from nextchat_training.losses import box_loss, cycle_loss, dice_loss, focal_loss, lm_loss, mask_iou, mask_loss

from nextchat_ros.model.heads import BoxDecoder, BoxEncoder


def test_lm_loss_uses_every_sample_and_shifts():
    # vocab 2, batch 2, length 3. Position t predicts label t+1.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]],
                           [[0.0, math.log(4)], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1], [-100, 1, -100]])
    # sample 0: p(0|t0)=1/2, p(1|t1)=1/4 ; sample 1: p(1|t0)=4/5.
    expected = -(math.log(1 / 2) + math.log(1 / 4) + math.log(4 / 5)) / 3
    assert lm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_box_loss_l1_and_giou_by_hand():
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    target = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    l1 = 0.25 * 4  # summed over the 4 coordinates
    inter, union, hull = 0.0625, 0.25 + 0.25 - 0.0625, 0.75 * 0.75
    giou = inter / union - (hull - union) / hull
    expected = 2.0 * l1 + 0.8 * (1 - giou)
    assert box_loss(pred, target, 2.0, 0.8).item() == pytest.approx(expected, abs=1e-6)
    assert box_loss(pred[:0], target[:0], 2.0, 0.8).item() == 0.0


def test_box_loss_giou_sees_the_clamped_ordered_box():
    # Raw decoder output with swapped corners and values outside [0, 1].
    raw = torch.tensor([[0.5, 0.5, -0.2, 1.3]])
    target = torch.tensor([[0.0, 0.5, 0.5, 1.0]])
    l1 = (0.5 + 0.0 + 0.7 + 0.3)
    assert box_loss(raw, target, 1.0, 0.0).item() == pytest.approx(l1, abs=1e-6)
    assert box_loss(raw, target, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # same box once valid


def test_dice_and_focal_by_hand():
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    p = torch.sigmoid(logits)[0]
    dice = 1 - (2 * p[0] * 1 + 1) / (p.sum() + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(dice.item(), abs=1e-6)
    alpha, gamma = 0.25, 2.0
    f0 = alpha * (1 - p[0]) ** gamma * -torch.log(p[0])
    f1 = (1 - alpha) * p[1] ** gamma * -torch.log(1 - p[1])
    assert focal_loss(logits, target).item() == pytest.approx(((f0 + f1) / 2).item(), abs=1e-6)


def test_mask_loss_combines_terms_with_weights():
    logits = torch.tensor([[[3.0, -3.0], [3.0, 3.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    iou_pred = torch.tensor([[0.5]])
    actual_iou = 2 / 3  # pred {0, 2, 3} vs target {0, 2}
    assert mask_iou(logits, target).item() == pytest.approx(actual_iou)
    expected = 20 * focal_loss(logits, target) + dice_loss(logits, target) + (0.5 - actual_iou) ** 2
    assert mask_loss(logits, iou_pred, target, 20.0, 1.0, 1.0).item() == pytest.approx(expected.item(), abs=1e-6)


def test_cycle_loss_is_zero_for_exact_inverses_and_positive_otherwise():
    # Linear heads with ReLU on positive inputs: enc maps a 4-d box into 4 dims of
    # an 8-d space, dec reads them back: an exact inverse pair on boxes and on h in
    # the image of enc.
    dec, enc = BoxDecoder(8, 4), BoxEncoder(8, 4)
    with torch.no_grad():
        for layer in (dec[0], dec[2], enc[0], enc[2]):
            layer.weight.zero_()
            layer.bias.zero_()
        enc[0].weight.copy_(torch.eye(4))
        enc[2].weight[:4].copy_(torch.eye(4))
        dec[0].weight[:, :4].copy_(torch.eye(4))
        dec[2].weight.copy_(torch.eye(4))
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8]])
    h = enc(boxes)
    assert cycle_loss(h, boxes, dec, enc).item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        dec[2].weight.mul_(0.5)
    h_err = torch.nn.functional.mse_loss(enc(dec(h)), h).item()
    b_err = (dec(enc(boxes)) - boxes).abs().sum(-1).mean().item()
    assert cycle_loss(h, boxes, dec, enc).item() == pytest.approx(h_err + b_err, abs=1e-6)
    assert b_err > 0.1


def test_cycle_training_makes_the_heads_inverse():
    torch.manual_seed(0)
    dec, enc = BoxDecoder(32, 64), BoxEncoder(32, 64)
    opt = torch.optim.Adam([*dec.parameters(), *enc.parameters()], lr=3e-3)

    def random_boxes(n):
        xy = torch.rand(n, 2) * 0.6
        return torch.cat([xy, xy + 0.1 + torch.rand(n, 2) * 0.3], -1)

    held_out = random_boxes(64)
    before = (dec(enc(held_out)) - held_out).abs().mean().item()
    for _ in range(300):
        boxes = random_boxes(64)
        loss = cycle_loss(enc(boxes).detach() + 0.01 * torch.randn(64, 32), boxes, dec, enc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = (dec(enc(held_out)) - held_out).abs().mean().item()
    assert after < 0.03 < before
