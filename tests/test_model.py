"""Shapes of both presets, the training forward, and the presets' registry."""

from dataclasses import replace

import pytest
import torch
from nextchat_training.objective import NextChatObjective, collate, loss_weights
from tokenizers import AddedToken, Tokenizer

from nextchat_ros.model import NextChatModel, get_preset
from nextchat_ros.model.build import TINY_TOKENIZER_DIR
from nextchat_ros.model.config import NextChatConfig, full_config
from nextchat_ros.model.tokenizer import TextTokenizer


def released_name_tokenizer(config):
    """The committed tiny tokenizer plus the released token names <at> / <boxes>."""
    tok = Tokenizer.from_file(str(TINY_TOKENIZER_DIR / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<at>", "<boxes>")])
    return TextTokenizer(tok, config.tokens)


def test_full_preset_has_the_released_shapes_on_the_meta_device():
    cfg = full_config()
    with torch.device("meta"):
        model = NextChatModel(cfg, released_name_tokenizer(cfg))
    assert model.vision_tower.num_patches == 576
    assert model.vision_tower.clip.config.hidden_size == 1024
    assert model.vision_tower.clip.config.num_hidden_layers == 24
    assert [tuple(model.projector[i].weight.shape) for i in (0, 2)] == [(4096, 1024), (4096, 4096)]
    assert isinstance(model.projector[1], torch.nn.GELU)
    assert [tuple(model.box_decoder[i].weight.shape) for i in (0, 2)] == [(2048, 4096), (4, 2048)]
    assert [tuple(model.box_encoder[i].weight.shape) for i in (0, 2)] == [(2048, 4), (4096, 2048)]
    assert [tuple(model.seg_prompt_mlp[i].weight.shape) for i in (0, 2)] == [(4096, 4096), (1024, 4096)]
    assert model.llm.config.hidden_size == 4096 and model.llm.config.num_hidden_layers == 32
    assert model.llm.config.vocab_size == 32005
    assert len(model.sam.image_encoder.blocks) == 32
    assert model.sam.image_encoder.patch_embed.proj.weight.shape[0] == 1280
    assert model.tokenizer.trigger_id == model.tokenizer._tok.token_to_id("<at>")
    with torch.device("meta"):
        image_tokens = model.encode_image(torch.empty(2, 3, 336, 336))
        hidden = model.llm.model(inputs_embeds=torch.empty(1, 600, 4096)).last_hidden_state
        sam_embedding = model.sam.encode_image(torch.empty(1, 3, 1024, 1024))
        low, iou = model.trigger_hidden_to_masks(torch.empty(3, 4096), torch.empty(3, 4), sam_embedding)
        boxes = model.box_decoder.decode(hidden[0, :5])
    assert image_tokens.shape == (2, 576, 4096)
    assert sam_embedding.shape == (1, 256, 64, 64)
    assert low.shape == (3, 1, 256, 256) and iou.shape == (3, 1)
    assert boxes.shape == (5, 4)


def test_tiny_preset_shapes(tiny_model):
    cfg = tiny_model.config
    assert cfg.llm.vocab_size == tiny_model.tokenizer.vocab_size
    image_tokens = tiny_model.encode_image(torch.zeros(2, 3, cfg.vision.image_size, cfg.vision.image_size))
    assert image_tokens.shape == (2, cfg.vision.num_patches, cfg.llm.hidden_size)
    emb = tiny_model.sam.encode_image(torch.zeros(1, 3, cfg.sam.image_size, cfg.sam.image_size))
    side = cfg.sam.embedding_size
    assert emb.shape == (1, cfg.sam.prompt_embed_dim, side, side)
    low, iou = tiny_model.trigger_hidden_to_masks(torch.zeros(2, cfg.llm.hidden_size), torch.rand(2, 4), emb)
    assert low.shape == (2, 1, 4 * side, 4 * side) and iou.shape == (2, 1)


def test_training_forward_computes_every_loss_and_reaches_every_head(tiny_model, scene):
    model = tiny_model.train()
    prompt = model.prompt
    ex1 = prompt.training_example("what is right of [0]?", "the blue ball [0] is right of it.",
                                  regions=[[0.1, 0.2, 0.3, 0.4]], answer_boxes=[[0.5, 0.5, 0.7, 0.8]])
    ex2 = prompt.training_example("find the cube and the cup.", "the cube [0] and the cup [1].",
                                  regions=[], answer_boxes=[[0.1, 0.1, 0.2, 0.2], [0.6, 0.3, 0.9, 0.6]])
    assert ex1.input_ids.count(model.tokenizer.location_id) == 2 and len(ex1.loc_boxes) == 2
    assert ex2.input_ids.count(model.tokenizer.trigger_id) == 2
    s = model.config.vision.image_size
    ss = model.config.sam.image_size
    low = 4 * model.config.sam.embedding_size
    masks = [torch.zeros(1, low, low), torch.ones(2, low, low)]
    batch = collate([ex1, ex2], pad_id=model.tokenizer.eos_id, vision_pixels=torch.randn(2, 3, s, s),
                    sam_pixels=torch.randn(2, 3, ss, ss), mask_targets=masks)
    assert batch.input_ids.shape[0] == 2 and batch.loc_boxes.shape == (4, 4)
    out = NextChatObjective(model, loss_weights("tiny"))(batch)
    for name in ("lm", "box", "cycle", "mask", "loss"):
        assert torch.isfinite(out[name]) and out[name].item() > 0, name
    assert out["pred_boxes"].shape == (3, 4)
    # targets are the answer boxes, in order, never the user region
    assert torch.allclose(out["target_boxes"], torch.tensor([[0.5, 0.5, 0.7, 0.8], [0.1, 0.1, 0.2, 0.2],
                                                             [0.6, 0.3, 0.9, 0.6]]))
    model.zero_grad()
    out["loss"].backward()
    for module in (model.projector, model.box_decoder, model.box_encoder, model.seg_prompt_mlp,
                   model.sam.mask_decoder, model.llm.model.layers[0], model.vision_tower.clip):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), type(module).__name__
    model.zero_grad()
    model.eval()


def test_lm_labels_cover_answer_and_triggers_but_not_locations(tiny_model):
    prompt = tiny_model.prompt
    tok = tiny_model.tokenizer
    ex = prompt.training_example("where is [0]?", "it is the cup [0].", regions=[[0, 0, 0.5, 0.5]],
                                 answer_boxes=[[0.1, 0.1, 0.4, 0.4]])
    labelled = [t for t in ex.labels if t != -100]
    assert tok.trigger_id in labelled and tok.location_id not in labelled
    assert labelled[-1] == tok.eos_id
    assert tok.decode(labelled).strip() == "it is the cup."


def test_config_round_trip_and_registry(tmp_path):
    cfg = get_preset("tiny")
    cfg.save(tmp_path / "config.json")
    assert NextChatConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    (tmp_path / "bad.json").write_text('{"vision": {"image_size": 224, "colour": 1}}')
    with pytest.raises(ValueError, match="colour"):
        NextChatConfig.load(tmp_path / "bad.json")


def test_grounding_attention_recomputes_the_llms_own_attention(scene):
    """The auxiliary loss supervises exactly the attention the LLM computes: head 0
    of the last layer, from a trigger, equals transformers' own eager attention."""
    from nextchat_training.objective import capture_layer_input, last_layer_head0_attention

    from nextchat_ros.model import build_model
    from nextchat_ros.model.heads import patch_coverage
    from nextchat_ros.model.vision import preprocess_image

    model = build_model("tiny", seed=3).eval()
    model.llm.config._attn_implementation = "eager"
    example = model.prompt.training_example("where is the red cube?", "Answer: [0] .", [], [[0.1, 0.2, 0.4, 0.5]])
    ids = torch.tensor([example.input_ids])
    pixels = preprocess_image(torch.from_numpy(scene.image.copy()), model.config.vision)[None]
    captured = {}
    model.llm.model.layers[-1].register_forward_pre_hook(capture_layer_input(captured), with_kwargs=True)
    with torch.no_grad():
        emb = model.embed(ids, model.encode_image(pixels), model.box_encoder(torch.tensor(example.loc_boxes)))
        out = model.llm.model(inputs_embeds=emb, output_attentions=True)
        trigger = (ids[0] == model.tokenizer.trigger_id).nonzero()[0]
        ours = last_layer_head0_attention(model, captured["h"], torch.tensor([0]), trigger)
    torch.testing.assert_close(ours[0], out.attentions[-1][0, 0, int(trigger)].float(), atol=1e-5, rtol=1e-4)
    cover = patch_coverage(torch.tensor([[0.0, 0.0, 0.25, 0.15], [0.5, 0.5, 0.52, 0.52]]), 10).view(2, 10, 10)
    assert cover[0, 0, :3].all() and cover[0, 1, :2].all() and not cover[0, 1, 2] and cover[0].sum() == 5
    assert cover[1].sum() == 1 and cover[1, 5, 5]  # a tiny box still marks the patch under its centre


def test_answer_attention_targets_point_answers_at_what_they_are_about(tiny_model):
    """Region captions look at the region asked about from each answer word; a grounded
    answer's first word looks at its objects; a bare "no" has no target."""
    from nextchat_training.objective import answer_attention_targets

    tok = tiny_model.tokenizer
    region, cube, ball = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.2, 0.6, 0.3, 0.8]
    examples = [tiny_model.prompt.training_example("describe [0].", "a red cube.", [region], []),
                tiny_model.prompt.training_example("is there a red cube in the image?",
                                                   "yes, the red cube [0] and the red cube [1].", [], [cube, ball]),
                tiny_model.prompt.training_example("is there a green cup in the image?", "no.", [], [])]
    batch = collate(examples, tok.eos_id, torch.zeros(3, 3, 8, 8))
    is_loc = batch.input_ids == tok.location_id
    rows, positions, boxes = answer_attention_targets(batch.input_ids, batch.labels, is_loc, batch.loc_boxes)
    first = [int((batch.labels[b] != -100).nonzero()[0]) for b in range(3)]
    caption = rows == 0
    n_words = int((batch.labels[0] != -100).sum())
    assert int(caption.sum()) == min(6, n_words)
    assert positions[caption].tolist() == list(range(first[0] - 1, first[0] - 1 + min(6, n_words)))
    assert torch.allclose(boxes[caption], torch.tensor(region).expand(int(caption.sum()), 4))
    pope = rows == 1
    assert positions[pope].tolist() == [first[1] - 1] * 2
    assert torch.allclose(boxes[pope], torch.tensor([cube, ball]))
    assert not (rows == 2).any()


def test_packed_turns_compute_what_single_turns_do(tiny_model):
    """Three questions about one image packed in one row (prompt.pack_turns) give the
    losses of the same three as separate rows: each turn is masked from the others and
    positioned right after the image prefix, as the predictor runs a question."""
    from nextchat_ros.model.prompt import pack_turns

    torch.manual_seed(0)
    model, tok = tiny_model, tiny_model.tokenizer
    region, cube, ball = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.2, 0.6, 0.3, 0.8]
    examples = [model.prompt.training_example("describe [0].", "a red cube.", [region], []),
                model.prompt.training_example("where are the red things?", "the red cube [0] and the ball [1].",
                                              [], [cube, ball]),
                model.prompt.training_example("is there a green cup in the image?", "no.", [], []),
                # the anchor's name ("red cube", ending at character 33) looks at the cube
                model.prompt.training_example("find the cup left of the red cube.", "Answer: [0] .", [], [ball],
                                              look=[(33, cube)])]
    s, m = model.config.vision.image_size, model.config.sam.image_size
    vision, sam = torch.randn(1, 3, s, s), torch.randn(1, 3, m, m)
    low = model.config.sam.embedding_size * 4
    masks = [None, (torch.rand(2, low, low) > 0.5).float(), None, (torch.rand(1, low, low) > 0.5).float()]
    single = collate(examples, tok.eos_id, vision.expand(4, -1, -1, -1), sam.expand(4, -1, -1, -1), masks)
    packed_example = pack_turns(examples, len(model.prompt.prefix()))
    packed = collate([packed_example], tok.eos_id, vision, sam, [torch.cat([masks[1], masks[3]])])
    assert packed.turns.max() == 4 and packed.input_ids.shape[1] < single.input_ids.numel()
    (position, _), = packed_example.look
    assert tok.decode(packed_example.input_ids[position - 1:position + 1]).strip() == "red cube"
    objective = NextChatObjective(model, loss_weights("tiny"))
    with torch.no_grad():
        a, b = objective(single), objective(packed)
        without_look = objective(collate([*examples[:3], replace(examples[3], look=[])], tok.eos_id,
                                     vision.expand(4, -1, -1, -1), sam.expand(4, -1, -1, -1), masks))
    for term in ("lm", "box", "cycle", "attention", "answer_attention", "mask", "pred_boxes"):
        assert torch.allclose(a[term], b[term], atol=1e-5), (term, a[term], b[term])
    assert not torch.allclose(a["attention"], without_look["attention"], atol=1e-4)


def test_only_single_turns_about_one_image_can_be_packed(tiny_model):
    from nextchat_ros.model.prompt import pack_turns

    prompt, n = tiny_model.prompt, len(tiny_model.prompt.prefix())
    one = prompt.training_example("where is the cube?", "the cube [0].", [], [[0.1, 0.1, 0.2, 0.2]])
    twice = pack_turns([one, one], n)
    with pytest.raises(ValueError, match="single-turn"):
        pack_turns([twice, one], n)


@pytest.mark.parametrize("shape", ["tiny", "full_structure"])
def test_the_fused_sam_encoder_equals_segment_anythings(shape):
    """RelPosAttention against segment-anything's own Attention, on the tiny preset's
    encoder and on a small random one with the full preset's block structure (windowed
    blocks with padding, global blocks, relative positions that are not zero)."""
    import copy

    from segment_anything.modeling.image_encoder import Attention

    from nextchat_ros.model.config import get_preset
    from nextchat_ros.model.sam import RelPosAttention, SamMaskHead

    config = copy.deepcopy(get_preset("tiny").sam)
    if shape == "full_structure":  # ViT-H's layout at a small width: 14-patch windows, every 4th block global
        config.image_size, config.patch_size, config.window_size = 320, 16, 14  # 20 patches: windows pad to 28
        config.encoder_embed_dim, config.encoder_depth, config.encoder_num_heads = 64, 8, 4
        config.encoder_global_attn_indexes = (3, 7)
    torch.manual_seed(0)
    fused = SamMaskHead(config).image_encoder.eval()
    with torch.no_grad():
        for block in fused.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    reference = copy.deepcopy(fused)
    for block in reference.blocks:
        block.attn.__class__ = Attention
    assert all(type(b.attn) is RelPosAttention for b in fused.blocks)
    assert {b.window_size for b in fused.blocks} == {0, config.window_size}
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        want, got = reference(pixels), fused(pixels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", ["tiny", "full_structure"])
def test_the_vision_tower_runs_sdpa_and_equals_eager_attention(shape):
    """The CLIP tower's attention is SDPA (transformers' default here, asserted so a
    change of default is seen), equal to the eager reference on the tiny tower and on
    a small one with ViT-L/14-336's grid (24 x 24 patches) and linear patch stem."""
    import copy

    from nextchat_ros.model.config import get_preset
    from nextchat_ros.model.vision import VisionTower

    config = copy.deepcopy(get_preset("tiny" if shape == "tiny" else "full").vision)
    if shape == "full_structure":
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 3
        config.num_attention_heads = 4
    torch.manual_seed(0)
    tower = VisionTower(config).eval()
    assert tower.clip.config._attn_implementation == "sdpa"
    reference = copy.deepcopy(tower)
    reference.clip.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        want, got = reference(pixels), tower(pixels)
    assert got.shape == (2, config.num_patches, config.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_size, patch_size", [(160, 16), (320, 32)])
def test_the_cnn_patch_stem_makes_the_towers_grid_and_is_one_function_in_train_and_eval_mode(image_size,
                                                                                            patch_size):
    """patch_stem 'cnn' gives the same token grid as the ConvStem, learns from its
    first convolution on, and (GroupNorm, no running statistics) computes the same
    features in train mode as in eval mode, so a frozen tower stays frozen in the
    lm stages, which run the whole model in train mode."""
    from nextchat_ros.model.vision import CNNStem, VisionTower

    config = get_preset("tiny").with_changes(
        {"vision": {"patch_stem": "cnn", "image_size": image_size, "patch_size": patch_size}}).vision
    torch.manual_seed(0)
    tower = VisionTower(config)
    assert isinstance(tower.clip.embeddings.patch_embedding, CNNStem)
    pixels = torch.randn(2, 3, image_size, image_size)
    features = tower.train()(pixels)
    assert features.shape == (2, 100, config.hidden_size)
    features.square().mean().backward()
    assert tower.clip.embeddings.patch_embedding[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()(pixels), tower.train()(pixels))
    with pytest.raises(ValueError, match="power-of-two patch size, not 12"):
        CNNStem(12, 128)
    with pytest.raises(ValueError, match="unknown patch_stem 'resnet'; use 'linear', 'conv' or 'cnn'"):
        VisionTower(get_preset("tiny").with_changes({"vision": {"patch_stem": "resnet"}}).vision)


def test_masks_of_all_objects_decoded_in_one_call_equal_one_object_at_a_time(tiny_model):
    sam = tiny_model.sam
    torch.manual_seed(0)
    embedding = torch.randn(1, sam.config.prompt_embed_dim, sam.config.embedding_size, sam.config.embedding_size)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.3, 0.2, 0.9, 0.8], [0.0, 0.6, 0.3, 1.0]])
    tokens = torch.randn(3, tiny_model.config.seg_prompt_tokens, sam.config.prompt_embed_dim)
    with torch.no_grad():
        masks, ious = sam.decode_masks(embedding, boxes, tokens)
        for i in range(3):
            one_mask, one_iou = sam.decode_masks(embedding, boxes[i:i + 1], tokens[i:i + 1])
            torch.testing.assert_close(masks[i:i + 1], one_mask, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ious[i:i + 1], one_iou, atol=1e-5, rtol=1e-5)
