"""Visual token dropping for LLaVA-1.5 (a CLIP tower with a class token, one image = one fixed grid).

The tower's features at the layer the projector reads are scored (CLS token included, as the query of
cls_attention / visionzip) and only the kept tokens are projected; with ``visual_drop_layer`` L it scores
after L tower layers instead and runs the remaining layers on the kept tokens only. A method that reads the
request's text (cdpruner) selects on the projector's output for every token, against the instruction's
token embeddings. LLaVA-NeXT and -OneVision are in :mod:`flopwise_vllm.visual_anyres`.
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
from vllm.multimodal import MULTIMODAL_REGISTRY

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
