"""The transformers reference for visual token dropping: the oracle the vLLM models are tested against.

Readable on purpose: one image, the features the engine scores, :func:`select`, a prompt with
only the kept placeholders, and a cache-free greedy loop (every step re-runs the whole sequence, so
positions are explicit and nothing depends on generation helpers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques import anyres
from flopwise.techniques import visual_drop as vd

QWEN = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")  # one layout, M-RoPE
NEXT = "LlavaNextForConditionalGeneration"
ONEVISION = "LlavaOnevisionForConditionalGeneration"


@dataclass
class Prepared:
    embeds: torch.Tensor  # [1, L, H] prompt embeddings with the kept image tokens in place
    positions: torch.Tensor | None  # [3, 1, L] M-RoPE (Qwen) or [1, L] explicit positions; None: 0..L-1
    delta: int  # decode position = index + delta (explicit positions); 0 otherwise
    image_tokens: int  # image tokens the language model sees
    kept: torch.Tensor  # indices kept of the image's tokens


def _splice(ids: torch.Tensor, image_id: int, kept: int) -> torch.Tensor:
    """Drop all but the first ``kept`` of the (single) run of image placeholders in ``ids``."""
    where = (ids == image_id).nonzero().flatten()
    drop = where[kept:]
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[drop] = False
    return ids[mask]


def _tower_with_drop(model, pixel_values, config: vd.VisualDropConfig):
    """LLaVA's CLIP tower with the image tokens dropped after ``config.layer`` layers: the layers up to the
    one the projector reads, the later ones on the class token + the kept tokens. Returns the tower's
    output for the kept tokens and their indices among the image's tokens."""
    from flopwise.ledger import FlopModel

    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    run = FlopModel.from_pretrained(model.config.to_dict()).spec.vision.layers  # up to the layer LLaVA reads
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for block in tower.encoder.layers[: config.layer]:
        x = block(x, None)
    sel = vd.select(x[0, 1:], config, x[0, 0])
    x = torch.cat([x[:, :1], sel.take(x[0, 1:])[None]], dim=1)
    for block in tower.encoder.layers[config.layer : run]:
        x = block(x, None)
    return x[0, 1:], sel.kept  # hidden_states carry no post-norm; LLaVA reads them as they are


def _anyres(model, inputs, config: vd.VisualDropConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-NeXT: the same fraction of the base view and of the stitched crops kept (each region scored
    with the base view's class token as the query), every row's newline kept. Returns the image's LM
    embeddings and the kept indices (base tokens first, then the grid's in reading order after them)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    if vd.uses_text(config) or (config.active and config.layer is not None):
        raise vd.VisualDropError("LLaVA-NeXT drops after its tower, on the image alone", vd.METHOD_FIELD)
    cfg, inner = model.config, model.model
    size = inputs["image_sizes"][0].tolist()
    hidden = inner.vision_tower(inputs["pixel_values"][0].to(model.dtype), output_hidden_states=True)
    feats = hidden.hidden_states[cfg.vision_feature_layer]
    has_cls = cfg.vision_feature_select_strategy == "default"
    cls, feats = (feats[0, 0], feats[:, 1:]) if has_cls else (None, feats)
    grid = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    return anyres.prune_views(
        feats, size, grid, config, cls, inner.multi_modal_projector, inner.image_newline
    )


def _onevision(model, inputs, config: vd.VisualDropConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-OneVision: transformers' packed embeddings (its grid shrunk after the projector where large), the
    same fraction of the base view's and of the grid's kept, scored on them, every newline kept."""
    if vd.uses_text(config) or (config.active and config.layer is not None):
        raise vd.VisualDropError(
            "LLaVA-OneVision drops after its projector, on the image alone", vd.METHOD_FIELD
        )
    cfg, inner = model.config, model.model
    packed = inner.get_image_features(
        inputs["pixel_values"].to(model.dtype),
        inputs["image_sizes"],
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        vision_aspect_ratio=cfg.vision_aspect_ratio,
    ).pooler_output[0]
    if not config.active:
        return packed, torch.arange(len(packed))
    v = cfg.vision_config
    size = inputs["image_sizes"][0].tolist()
    _, tokens, rows = anyres.layout(
        size, cfg.image_grid_pinpoints, v.image_size, v.patch_size, cfg.vision_aspect_ratio
    )
    return anyres.prune_packed(packed, tokens, rows, config, inner.image_newline)


@torch.no_grad()
def prepare(model, processor, image, prompt: str, config: vd.VisualDropConfig) -> Prepared:
    """Embed ``prompt`` (a rendered chat prompt with one image placeholder) with ``image`` at ``config``."""
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    ids = inputs["input_ids"][0]
    dtype = model.dtype
    arch = model.config.architectures[0]
    if arch == "LlavaForConditionalGeneration":
        cfg = model.config
        image_id = cfg.image_token_index
        if config.layer is not None and config.active:
            selected, kept = _tower_with_drop(model, inputs["pixel_values"].to(dtype), config)
            image_embeds = model.model.multi_modal_projector(selected)
        else:
            hidden = model.model.vision_tower(
                inputs["pixel_values"].to(dtype), output_hidden_states=True
            ).hidden_states
            feats = hidden[cfg.vision_feature_layer][0]
            cls, tokens = (
                (feats[0], feats[1:]) if cfg.vision_feature_select_strategy == "default" else (None, feats)
            )
            if vd.uses_text(config):  # select among the projected tokens, against the instruction
                projected = model.model.multi_modal_projector(tokens)
                special = set(processor.tokenizer.all_special_ids)
                text_ids = vd.instruction_ids(ids.tolist(), image_id, special)
                text = model.get_input_embeddings()(torch.tensor(text_ids, dtype=torch.long))
                sel = vd.select(projected, config, cls, text)
                kept, image_embeds = sel.kept, sel.take(projected)
            else:
                sel = vd.select(tokens, config, cls)
                kept, image_embeds = sel.kept, model.model.multi_modal_projector(sel.take(tokens))
        positions, delta = None, 0
    elif arch in (NEXT, ONEVISION):
        image_id = model.config.image_token_index
        image_embeds, kept = (_anyres if arch == NEXT else _onevision)(model, inputs, config)
        positions, delta = None, 0
    elif arch in QWEN:
        if vd.uses_text(config):
            raise vd.VisualDropError(f"{config.method} reads the text: not for {arch}", vd.METHOD_FIELD)
        cfg = model.config
        image_id = cfg.image_token_id
        visual = model.model.visual
        pixels, grid = inputs["pixel_values"].to(dtype), inputs["image_grid_thw"]
        out = visual(pixels, grid_thw=grid)
        full = out.pooler_output if hasattr(out, "pooler_output") else out
        sel = vd.select(vd.group_mean(visual.patch_embed(pixels), visual.spatial_merge_size), config)
        kept, image_embeds = sel.kept, sel.take(full)
    else:
        raise ValueError(
            f"visual token dropping supports LLaVA(-NeXT/-OneVision) and Qwen2/2.5-VL, not {arch}"
        )
    ids = _splice(ids, image_id, len(image_embeds))
    embeds = model.get_input_embeddings()(ids[None]).clone()
    embeds[0, ids == image_id] = image_embeds.to(embeds.dtype)
    if arch in QWEN:
        merge = visual.spatial_merge_size
        t, h, w = grid[0].tolist()
        offset = int((ids == image_id).nonzero()[0])
        pos, delta = vd.mrope_positions(len(ids), [(offset, (t, h // merge, w // merge), kept.numpy())])
        positions = torch.from_numpy(pos.copy()).long()[:, None, :]
    return Prepared(embeds, positions, delta, len(image_embeds), kept)


@torch.no_grad()
def greedy(model, prepared: Prepared, max_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding from prepared prompt embeddings; stops at ``eos_token_id`` (included, as vLLM returns
    it)."""
    embeds, out = prepared.embeds, []
    embed = model.get_input_embeddings()
    for _ in range(max_tokens):
        kwargs = {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long)}
        if prepared.positions is not None:
            n = embeds.shape[1] - prepared.positions.shape[-1]
            tail = torch.arange(n) + prepared.positions.shape[-1] + prepared.delta
            tail = tail.expand(*prepared.positions.shape[:-1], n)
            kwargs["position_ids"] = torch.cat([prepared.positions, tail], dim=-1)
        logits = model(**kwargs).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        if token == eos_token_id:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([[token]])).to(embeds.dtype)], dim=1)
    return out


def generate(
    model, processor, image, prompt: str, config: vd.VisualDropConfig, max_tokens: int = 8
) -> list[int]:
    prepared = prepare(model, processor, image, prompt, config)
    return greedy(model, prepared, max_tokens, processor.tokenizer.eos_token_id)
