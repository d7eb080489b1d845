"""Visual token dropping for Qwen2-VL and Qwen2.5-VL (images of any size; 2x2 patches merged into one LM
token; M-RoPE). One mix-in serves both: they share the processor's layout, the patch embedding and M-RoPE;
Qwen2.5-VL's windowed attention reorders patches inside the tower only, and its output comes back in the
input order.

``get_mrope_input_positions`` gives the kept tokens their original grid positions and the text after an
image the positions it has with the whole image. It runs when a request is added, before the encoder, so
Qwen2-VL scores tokens on the patch embeddings (one cheap linear layer, recomputed identically in both
places) rather than on the encoder's output; a merging method (visionzip) applies its merge to the encoder's
output. Methods that read the text are refused (no token is in the language model's space yet when the
positions are fixed). Videos are not pruned.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from flopwise.techniques import visual_drop as vd
from flopwise_vllm.visual_drop import DropFields, configs, feature_config


class QwenDropFields(DropFields):
    image_key = "image_grid_thw"  # pixel_values is flat: all images' patches in one tensor


class QwenDrop:
    """Model mix-in: the kept tokens' M-RoPE positions (before the encoder) and embeddings (after it)."""

    def kept_tokens(self, pixel_values: torch.Tensor, config: vd.VisualDropConfig) -> vd.Selection:
        """What one image's LM tokens keep, chosen on its merged patch embeddings."""
        merge = self.visual.spatial_merge_size
        visual = self.visual
        with torch.no_grad():  # vLLM normalises pixels inside the tower (the processor ships them raw)
            emb = visual.patch_embed(visual.input_norm(pixel_values.to(device=visual.device), visual.dtype))
        return vd.select(vd.group_mean(emb, merge), config)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if not any(
            f.modality == "image" and f.data is not None and vd.KEEP_FIELD in f.data for f in mm_features
        ):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        images = []
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise NotImplementedError("flopwise visual dropping: Qwen videos are not supported")
            t, h, w = f.data["image_grid_thw"].data.tolist()
            config = feature_config(f.data)
            kept = None
            if config.active and "pixel_values" not in f.data:
                # vLLM strips the pixels of an image whose placeholder is all a prefix-cache hit: no token of
                # it will be computed, so its positions are never read; the text after it does not depend on
                # which tokens were kept (vd.mrope_positions).
                kept = np.arange(f.mm_position.length)
            elif config.active:
                kept = self.kept_tokens(f.data["pixel_values"].data, config).kept.cpu().numpy()
            images.append((f.mm_position.offset, (t, h // merge, w // merge), kept))
        pos, delta = vd.mrope_positions(len(input_tokens), images)
        return torch.from_numpy(np.ascontiguousarray(pos)), delta

    def embed_multimodal(self, **kwargs):
        per_image = configs(kwargs)
        if per_image is None or not any(c.active for c in per_image):
            return super().embed_multimodal(**kwargs)
        if "pixel_values_videos" in kwargs or "video_embeds" in kwargs:
            raise NotImplementedError("flopwise visual dropping: Qwen videos are not supported")
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input["type"] != "pixel_values":
            raise ValueError(f"{vd.KEEP_FIELD} < 1 needs pixel inputs, not precomputed image embeddings")
        embeds = self._process_image_input(image_input)
        grid = image_input["image_grid_thw"]
        pixels = image_input["pixel_values"].split(grid.prod(-1).tolist())
        return tuple(
            e if not c.active else self.kept_tokens(p, c).take(e)
            for e, p, c in zip(embeds, pixels, per_image)
        )


class FlopwiseQwen2VLProcessor(QwenDropFields, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FlopwiseQwen2VLProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class FlopwiseQwen2VL(QwenDrop, Qwen2VLForConditionalGeneration):
    pass


class FlopwiseQwen25VLProcessor(QwenDropFields, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    FlopwiseQwen25VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class FlopwiseQwen25VL(QwenDrop, Qwen2_5_VLForConditionalGeneration):
    pass
