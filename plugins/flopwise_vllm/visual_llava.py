"""Visual token dropping for LLaVA-1.5 (a CLIP tower with a class token, one image = one fixed grid).

The tower's features at the layer the projector reads are scored (CLS token included, as the query of
cls_attention / visionzip) and only the kept tokens are projected; with ``visual_drop_layer`` L it scores
after L tower layers instead and runs the remaining layers on the kept tokens only. A method that reads the
request's text (cdpruner) selects on the projector's output for every token, against the instruction's
token embeddings.

LLaVA-NeXT (anyres: a base view + crops stitched into one grid, a newline embedding after each row) keeps
the same fraction of the base view and of the grid, chosen on the tower's features, and every newline
(:mod:`flopwise.techniques.anyres`); it drops after the tower, without the text. Videos are not pruned.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from flopwise.techniques import anyres
from flopwise.techniques import visual_drop as vd
from flopwise_vllm.visual_drop import DropFields, configs, queries


class FlopwiseLlavaProcessor(DropFields, LlavaMultiModalProcessor):
    reads_text = True

    def image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_index

    def tower_layers(self) -> int:
        from flopwise.ledger import FlopModel

        return FlopModel.from_pretrained(self.info.get_hf_config().to_dict()).spec.vision.layers


@MULTIMODAL_REGISTRY.register_processor(
    FlopwiseLlavaProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class FlopwiseLlava(LlavaForConditionalGeneration):
    def embed_multimodal(self, **kwargs):
        per_image = configs(kwargs)
        texts = queries(kwargs, 0 if per_image is None else len(per_image))
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if (
            per_image is None
            or isinstance(image_input, LlavaImageEmbeddingInputs)
            or not any(c.active for c in per_image)
        ):
            return self._process_image_input(image_input)
        pixels = image_input["pixel_values"]
        out: list[torch.Tensor | None] = [None] * len(per_image)
        # Images dropped inside the tower run it one by one; the others share one tower pass below.
        for i, config in enumerate(per_image):
            if config.active and config.layer is not None:
                out[i] = self._drop_in_tower(pixels[i : i + 1], config)
        rest = [i for i, o in enumerate(out) if o is None]
        if rest:
            # "full" keeps the CLS token: it is the query of cls_attention; the LM never sees it (strategy
            # "default").
            feats = self.vision_tower(pixels[rest], feature_select_strategy="full")
            has_cls = self.config.vision_feature_select_strategy == "default"
            for f, i in zip(feats, rest):
                cls, tokens = (f[0], f[1:]) if has_cls else (None, f)
                config = per_image[i]
                if vd.uses_text(config):  # select among the projected tokens, against the instruction
                    projected = self.multi_modal_projector(tokens)
                    text = self.get_language_model().embed_input_ids(texts[i].to(projected.device))
                    out[i] = vd.select(projected, config, cls, text).take(projected)
                else:
                    out[i] = self.multi_modal_projector(vd.select(tokens, config, cls).take(tokens))
        return out

    def _drop_in_tower(self, pixel_values, config):
        """Run the tower's first ``config.layer`` layers on every patch of one image (``pixel_values``
        [1, C, H, W]), the rest on the CLS token + the kept ones."""
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"{vd.LAYER_FIELD} needs a tower with a class token (vision_feature_select_strategy "
                "'default')"
            )
        tower = self.vision_tower.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixel_values.to(self.vision_tower.dtype)))
        for block in tower.encoder.layers[: config.layer]:
            x = block(x)
        kept = vd.select(x[0, 1:], config, x[0, 0]).take(x[0, 1:])
        x = torch.cat([x[:, :1], kept[None]], dim=1)
        for block in tower.encoder.layers[config.layer :]:
            x = block(x)
        if tower.post_layernorm is not None:
            x = tower.post_layernorm(x)
        return self.multi_modal_projector(x[0, 1:])


class FlopwiseLlavaNextProcessor(DropFields, LlavaNextMultiModalProcessor):
    text_refusal = "flopwise selects its anyres crops on the image alone"

    def kept_count(self, tokens: int, keep: float, item) -> int:
        cfg = self.info.get_hf_config()
        size = tuple(item["image_sizes"].data.tolist())
        grid, side = _grid(cfg, size)
        base = tokens - sum(anyres.counts(size, grid, side))
        return anyres.kept_tokens(size, grid, side, base, keep)


def _grid(cfg, size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """An image's crops (rows, cols) and tokens per crop side."""
    tile = cfg.vision_config.image_size
    return anyres.best_grid(size, cfg.image_grid_pinpoints, tile), tile // cfg.vision_config.patch_size


@MULTIMODAL_REGISTRY.register_processor(
    FlopwiseLlavaNextProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class FlopwiseLlavaNext(LlavaNextForConditionalGeneration):
    def embed_multimodal(self, **kwargs):
        per_image = configs(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if per_image is None or image_input["type"] != "pixel_values" or not any(c.active for c in per_image):
            return self._process_image_input(image_input)
        pixels, sizes = image_input["pixel_values"], image_input["image_sizes"]
        return [
            self._drop(pixels[i], tuple(sizes[i].tolist()), config)
            if config.active
            else self._process_image_input(
                {"type": "pixel_values", "pixel_values": pixels[i : i + 1], "image_sizes": sizes[i : i + 1]}
            )[0]
            for i, config in enumerate(per_image)
        ]

    def _drop(self, pixels: torch.Tensor, size: tuple[int, int], config: vd.VisualDropConfig):
        """One image's LM embeddings with the kept tokens of its base view and of its grid."""
        grid, side = _grid(self.config, size)
        pixels = pixels[: 1 + grid[0] * grid[1]]  # a batch pads each image's crops to the most crops
        feats = self.vision_tower(pixels, select_layers=self.select_layers, feature_select_strategy="full")
        has_cls = self.config.vision_feature_select_strategy == "default"
        cls, feats = (feats[0, 0], feats[:, 1:]) if has_cls else (None, feats)
        order = anyres.grid_order(size, grid, side).to(feats.device)
        base, tokens = feats[0], feats[1:].flatten(0, 1)[order[order >= 0]]
        sb, sg = vd.select(base, config, cls), vd.select(tokens, config, cls)
        project = self.multi_modal_projector
        layout = anyres.kept_layout(order.cpu(), sg.kept.cpu()).to(feats.device)
        return anyres.pack(
            project(sb.take(base)), project(sg.take(tokens)), layout, order, self.image_newline
        )
