"""Visual token dropping in vLLM: LLaVA-1.5 and Qwen2-VL subclasses that prune image tokens before the LM.

``register()`` (``VISUAL_MODELS``) points vLLM's ``LlavaForConditionalGeneration`` and
``Qwen2VLForConditionalGeneration``
at the classes below (``ModelRegistry`` allows out-of-tree overrides); with ``visual_keep`` 1 they are
the stock models. Three places must agree on how many tokens an image keeps, and they all call
:func:`flopwise.techniques.visual_drop.keep_count`:

* the processor (front end) writes that many placeholder tokens, so the prefill really shrinks, and
  carries ``visual_keep`` / ``visual_drop`` to the model as two per-image fields next to the pixels
  (they are part of the request's ``mm_processor_kwargs``, hence of the multimodal cache key);
* ``embed_multimodal`` (worker) keeps exactly that many tokens, chosen by
  :func:`flopwise.techniques.visual_drop.keep_indices`;
* Qwen2-VL only: ``get_mrope_input_positions`` gives the kept tokens their original grid positions. It
  runs when a request is added, before the encoder, so Qwen2-VL scores tokens on the patch embeddings
  (one cheap linear layer, recomputed identically in both places) rather than on the encoder's output.

LLaVA scores the vision tower's features at the layer the projector reads, CLS token included, and
projects only the kept tokens; with ``visual_drop_layer`` L it scores after L tower layers instead and runs
the remaining layers on the kept tokens only. LLaVA-NeXT (anyres tiles) and videos are not pruned.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from flopwise.options import parse
from flopwise.techniques import OptionError
from flopwise.techniques import visual_drop as vd
from flopwise_vllm.options import server_defaults


def request_config(processor, hf_kwargs: Mapping[str, object]) -> vd.VisualDropConfig:
    """The request's options merged over ``--mm-processor-kwargs`` and the server defaults; errors name the
    field. With flopwise serve's gate on, other per-request keys are refused here, whatever the endpoint."""
    server = processor.info.ctx.model_config.mm_processor_kwargs or {}
    others = sorted(k for k in hf_kwargs if k not in vd.FIELDS and k not in server)
    if others and server_defaults().mm_kwargs_gate:
        raise OptionError(
            f"per-request mm_processor_kwargs {others} are disabled on this server (start it with "
            "--trust-request-mm-kwargs to allow them)",
            "mm_processor_kwargs",
        )
    merged = processor.info.ctx.get_merged_mm_kwargs(hf_kwargs)
    opts = parse({f: merged.get(f) for f in vd.FIELDS}, server_defaults())
    config = opts.visual or vd.VisualDropConfig()
    if config.layer is not None:
        layers = processor.tower_layers()
        if layers is None:
            raise vd.VisualDropError(
                f"{vd.LAYER_FIELD} (dropping inside the vision tower) is supported for LLaVA only",
                vd.LAYER_FIELD,
            )
        if config.layer > layers:
            raise vd.VisualDropError(
                f"{vd.LAYER_FIELD}={config.layer}, but this model's vision tower runs {layers} layers",
                vd.LAYER_FIELD,
            )
    return config


class _DropFields:
    """Processor mix-in: strip the options before the HF processor, add them back as per-image fields."""

    image_key = "pixel_values"  # one row per image

    def _call_hf_processor(self, hf_data, hf_kwargs):
        config = request_config(self, hf_kwargs)
        # Request-level options stop here; server-level ones (--mm-processor-kwargs) reach the HF processor,
        # which ignores unknown keywords with a warning.
        out = super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if k not in vd.FIELDS})
        n = self._num_images(out)
        if n:
            out[vd.KEEP_FIELD] = torch.full((n,), config.keep, dtype=torch.float64)
            out[vd.METHOD_FIELD] = torch.full((n,), config.code, dtype=torch.int64)
            out[vd.LAYER_FIELD] = torch.full(
                (n,), -1 if config.layer is None else config.layer, dtype=torch.int64
            )
        return out

    def tower_layers(self) -> int | None:
        """Vision-tower layers a request may drop after (``visual_drop_layer``); None: not supported."""
        return None

    def _num_images(self, out) -> int:
        pv = out.get(self.image_key)
        return 0 if pv is None else len(pv)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for name in vd.FIELDS:
            fields[name] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = []
        for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            if update.modality == "image" and isinstance(update, PromptReplacement):
                update = PromptReplacement(
                    "image", update.target, _kept_replacement(update.replacement, out_mm_kwargs)
                )
            updates.append(update)
        return updates


def _kept_replacement(full, out_mm_kwargs):
    def replacement(item_idx: int):
        tokens = full(item_idx)
        keep = _item_keep(out_mm_kwargs, item_idx)
        return tokens if keep is None else tokens[: vd.keep_count(len(tokens), keep)]

    return replacement


def _item_keep(out_mm_kwargs, item_idx: int) -> float | None:
    items = out_mm_kwargs.get("image") if hasattr(out_mm_kwargs, "get") else None
    if not items:
        return None
    elem = items[item_idx].get(vd.KEEP_FIELD)
    return None if elem is None else float(elem.data)


def _configs(kwargs: dict) -> list[vd.VisualDropConfig] | None:
    keep, code, layer = (kwargs.pop(f, None) for f in vd.FIELDS)
    if keep is None:
        return None
    return [
        vd.VisualDropConfig.from_code(float(k), int(c), int(lay))
        for k, c, lay in zip(_flat(keep), _flat(code), _flat(layer))
    ]


def _flat(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return [v for item in x for v in _flat(item)] if isinstance(x, (list, tuple)) else [x]


# -- LLaVA-1.5 -------------------------------------------------------------------------------------
class FlopwiseLlavaProcessor(_DropFields, LlavaMultiModalProcessor):
    def tower_layers(self) -> int:
        from flopwise.ledger import FlopModel

        return FlopModel.from_pretrained(self.info.get_hf_config().to_dict()).spec.vision.layers


@MULTIMODAL_REGISTRY.register_processor(
    FlopwiseLlavaProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class FlopwiseLlava(LlavaForConditionalGeneration):
    def embed_multimodal(self, **kwargs):
        configs = _configs(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if (
            configs is None
            or isinstance(image_input, LlavaImageEmbeddingInputs)
            or not any(c.active for c in configs)
        ):
            return self._process_image_input(image_input)
        if any(c.active and c.layer is not None for c in configs):
            return self._drop_in_tower(image_input["pixel_values"], configs)
        # "full" keeps the CLS token: it is the query of cls_attention; the LM never sees it (strategy
        # "default").
        feats = self.vision_tower(image_input["pixel_values"], feature_select_strategy="full")
        has_cls = self.config.vision_feature_select_strategy == "default"
        out = []
        for f, config in zip(feats, configs):
            cls, tokens = (f[0], f[1:]) if has_cls else (None, f)
            idx = vd.keep_indices(tokens, config, cls)
            out.append(self.multi_modal_projector(tokens[idx]))
        return out

    def _drop_in_tower(self, pixel_values, configs):
        """Run the tower's first ``layer`` layers on every patch, the rest on the CLS token + the kept
        ones."""
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"{vd.LAYER_FIELD} needs a tower with a class token (vision_feature_select_strategy "
                "'default')"
            )
        tower = self.vision_tower.vision_model
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(self.vision_tower.dtype)))
        out = []
        for h, config in zip(hidden, configs):
            layer = len(tower.encoder.layers) if config.layer is None else config.layer
            x = h[None]
            for block in tower.encoder.layers[:layer]:
                x = block(x)
            idx = vd.keep_indices(x[0, 1:], config, x[0, 0])
            x = torch.cat([x[:, :1], x[:, 1:][:, idx]], dim=1)
            for block in tower.encoder.layers[layer:]:
                x = block(x)
            if tower.post_layernorm is not None:
                x = tower.post_layernorm(x)
            out.append(self.multi_modal_projector(x[0, 1:]))
        return out


# -- Qwen2-VL --------------------------------------------------------------------------------------
class FlopwiseQwen2VLProcessor(_DropFields, Qwen2VLMultiModalProcessor):
    image_key = "image_grid_thw"  # pixel_values is flat: all images' patches in one tensor


@MULTIMODAL_REGISTRY.register_processor(
    FlopwiseQwen2VLProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class FlopwiseQwen2VL(Qwen2VLForConditionalGeneration):
    def kept_tokens(self, pixel_values: torch.Tensor, config: vd.VisualDropConfig) -> torch.Tensor:
        """Indices of one image's LM tokens to keep, scored on its merged patch embeddings."""
        merge = self.visual.spatial_merge_size
        visual = self.visual
        with torch.no_grad():  # vLLM normalises pixels inside the tower (the processor ships them raw)
            emb = visual.patch_embed(visual.input_norm(pixel_values.to(device=visual.device), visual.dtype))
        return vd.keep_indices(vd.group_mean(emb, merge), config)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if not any(
            f.modality == "image" and f.data is not None and vd.KEEP_FIELD in f.data for f in mm_features
        ):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        images = []
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise NotImplementedError("flopwise visual dropping: Qwen2-VL videos are not supported")
            t, h, w = f.data["image_grid_thw"].data.tolist()
            config = vd.VisualDropConfig.from_code(*(f.data[name].data.item() for name in vd.FIELDS))
            kept = None
            if config.active:
                kept = self.kept_tokens(f.data["pixel_values"].data, config).cpu().numpy()
            images.append((f.mm_position.offset, (t, h // merge, w // merge), kept))
        pos, delta = vd.mrope_positions(len(input_tokens), images)
        return torch.from_numpy(np.ascontiguousarray(pos)), delta

    def embed_multimodal(self, **kwargs):
        configs = _configs(kwargs)
        if configs is None or not any(c.active for c in configs):
            return super().embed_multimodal(**kwargs)
        if "pixel_values_videos" in kwargs or "video_embeds" in kwargs:
            raise NotImplementedError("flopwise visual dropping: Qwen2-VL videos are not supported")
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input["type"] != "pixel_values":
            raise ValueError(f"{vd.KEEP_FIELD} < 1 needs pixel inputs, not precomputed image embeddings")
        embeds = self._process_image_input(image_input)
        grid = image_input["image_grid_thw"]
        pixels = image_input["pixel_values"].split(grid.prod(-1).tolist())
        return tuple(
            e if not c.active else e[self.kept_tokens(p, c).to(e.device)]
            for e, p, c in zip(embeds, pixels, configs)
        )
