"""Visual token dropping for the anyres LLaVA families: an image is a base view plus crops stitched into one
grid, each grid row closed by a newline embedding (:mod:`flopwise.techniques.anyres`). The same fraction of
the base view and of the grid is kept, and every newline; the text is not read (``cdpruner`` and
``visual_drop_layer`` are refused).

* LLaVA-NeXT scores the tower's features (the base view's class token as the query, as LLaVA-1.5 does) and
  projects only the kept tokens.
* LLaVA-OneVision shrinks a large grid (bilinear, ``anyres_max_9``) after its projector, so its tokens exist
  only there: it drops from the packed embeddings, scored on them without a query; the projector runs on
  every token, as in stock vLLM. Videos are not pruned.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from flopwise.techniques import anyres
from flopwise.techniques import visual_drop as vd
from flopwise_vllm.visual_drop import DropFields, configs


def image_layout(cfg, size: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
    """An image's crops (rows, cols), grid tokens and rows under a model's HF config."""
    v = cfg.vision_config
    aspect = getattr(cfg, "vision_aspect_ratio", None)
    return anyres.layout(size, cfg.image_grid_pinpoints, v.image_size, v.patch_size, aspect)


class AnyresFields(DropFields):
    text_refusal = "flopwise selects its anyres crops on the image alone"

    def kept_count(self, tokens: int, keep: float, item) -> int:
        _, grid_tokens, rows = image_layout(
            self.info.get_hf_config(), tuple(item["image_sizes"].data.tolist())
        )
        return anyres.kept_tokens(grid_tokens, rows, tokens - grid_tokens - rows, keep)


class FlopwiseLlavaNextProcessor(AnyresFields, LlavaNextMultiModalProcessor):
    pass


class FlopwiseLlavaOnevisionProcessor(AnyresFields, LlavaOnevisionMultiModalProcessor):
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # OneVision calls the HF processor itself, not through _call_hf_processor
        parent = super()._apply_hf_processor_main
        return self.with_fields(hf_kwargs, lambda kw: parent(mm_items, kw))


def _one(image_input, i: int) -> dict:
    """Image ``i`` of a parsed pixel input, as the stock ``_process_image_input`` takes it."""
    pixels, sizes = image_input["pixel_values"], image_input["image_sizes"]
    return {"type": "pixel_values", "pixel_values": pixels[i : i + 1], "image_sizes": sizes[i : i + 1]}


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
            self._drop(pixels[i], tuple(sizes[i].tolist()), c)
            if c.active
            else self._process_image_input(_one(image_input, i))[0]
            for i, c in enumerate(per_image)
        ]

    def _drop(self, pixels: torch.Tensor, size: tuple[int, int], config: vd.VisualDropConfig):
        """One image's LM embeddings with the kept tokens of its base view and of its grid."""
        grid = image_layout(self.config, size)[0]
        pixels = pixels[: 1 + grid[0] * grid[1]]  # a batch pads each image's crops to the most crops
        feats = self.vision_tower(pixels, select_layers=self.select_layers, feature_select_strategy="full")
        has_cls = self.config.vision_feature_select_strategy == "default"
        cls, feats = (feats[0, 0], feats[:, 1:]) if has_cls else (None, feats)
        project, newline = self.multi_modal_projector, self.image_newline
        return anyres.prune_views(feats, size, grid, config, cls, project, newline)[0]


@MULTIMODAL_REGISTRY.register_processor(
    FlopwiseLlavaOnevisionProcessor,
    info=LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class FlopwiseLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    def embed_multimodal(self, **kwargs):
        per_image = configs(kwargs)
        if per_image is None or not any(c.active for c in per_image):
            return super().embed_multimodal(**kwargs)
        if "pixel_values_videos" in kwargs:
            raise NotImplementedError("flopwise visual dropping: LLaVA-OneVision videos are not supported")
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input["type"] != "pixel_values":
            raise ValueError(f"{vd.KEEP_FIELD} < 1 needs pixel inputs, not precomputed image embeddings")
        packed = self._process_image_input(image_input)
        out = []
        for p, size, c in zip(packed, image_input["image_sizes"], per_image):
            _, tokens, rows = image_layout(self.config, tuple(size.tolist()))
            out.append(anyres.prune_packed(p, tokens, rows, c, self.image_newline)[0] if c.active else p)
        return tuple(out)
