"""Visual token dropping in vLLM: what every family's processor shares (the models are in
:mod:`flopwise_vllm.visual_llava`, :mod:`flopwise_vllm.visual_anyres` and :mod:`flopwise_vllm.visual_qwen`).

``register()`` (``VISUAL_MODELS``) points vLLM's LLaVA(-NeXT, -OneVision) and Qwen2(.5)-VL architectures at
flopwise's subclasses (``ModelRegistry`` allows out-of-tree overrides); with ``visual_keep`` 1 they are the
stock models. Three places must agree on how many tokens an image keeps, and they all call
:func:`flopwise.techniques.visual_drop.keep_count` (anyres LLaVA: per region,
:func:`flopwise.techniques.anyres.kept_tokens`):

* the processor (front end) writes that many placeholder tokens, so the prefill really shrinks, and
  carries ``visual_keep`` / ``visual_drop`` / ``visual_drop_layer`` (and, for a method that reads the
  text, the instruction's ids) to the model as per-image fields next to the pixels (they are part of the
  request's processor kwargs, hence of the multimodal cache key);
* ``embed_multimodal`` (worker) keeps exactly that many tokens (or merges, for visionzip), chosen by
  :func:`flopwise.techniques.visual_drop.select`;
* Qwen only: ``get_mrope_input_positions`` gives the kept tokens their original grid positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from flopwise.options import parse
from flopwise.techniques import OptionError
from flopwise.techniques import visual_drop as vd
from flopwise_vllm.options import server_defaults

# What vLLM itself adds to the HF processor's kwargs (not the request): "truncation" where it hands the HF
# processor placeholder text (LLaVA-NeXT).
ENGINE_KEYS = ("truncation",)


def request_config(processor, hf_kwargs: Mapping[str, object]) -> vd.VisualDropConfig:
    """The request's options merged over ``--mm-processor-kwargs`` and the server defaults; errors name the
    field. With flopwise serve's gate on, other per-request keys are refused here, whatever the endpoint."""
    server = processor.info.ctx.model_config.mm_processor_kwargs or {}
    others = sorted(
        k for k in hf_kwargs if k not in (*vd.FIELDS, vd.QUERY_FIELD, *ENGINE_KEYS) and k not in server
    )
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
                f"{vd.LAYER_FIELD} (dropping inside the vision tower) is supported for LLaVA-1.5 only",
                vd.LAYER_FIELD,
            )
        if config.layer > layers:
            raise vd.VisualDropError(
                f"{vd.LAYER_FIELD}={config.layer}, but this model's vision tower runs {layers} layers",
                vd.LAYER_FIELD,
            )
    if vd.uses_text(config) and not processor.reads_text:
        raise vd.VisualDropError(
            f"{vd.METHOD_FIELD}={config.method} reads the request's text, which "
            f"{processor.info.get_hf_config().architectures[0]} cannot: {processor.text_refusal} (use a "
            "text-free method)",
            vd.METHOD_FIELD,
        )
    if vd.uses_text(config) and config.layer is not None:
        raise vd.VisualDropError(
            f"{vd.METHOD_FIELD}={config.method} selects on the projector's output, after the tower: "
            f"{vd.LAYER_FIELD} does not apply",
            vd.LAYER_FIELD,
        )
    return config


class DropFields:
    """Processor mix-in: strip the options before the HF processor, add them back as per-image fields."""

    image_key = "pixel_values"  # one row per image
    reads_text = False  # whether the model can run a method that reads the request's text
    text_refusal = "its image tokens' positions are set before its encoder runs"  # why not, if it cannot

    def apply(self, inputs, timing_ctx):
        # A query-aware method needs the prompt, which the HF processor never sees (vLLM gives it dummy text):
        # put the instruction's ids among the processor kwargs, so they reach the model as a per-image field
        # and key the multimodal caches (the same image under another question is another entry).
        kwargs = {k: v for k, v in inputs.hf_processor_mm_kwargs.items() if k != vd.QUERY_FIELD}
        config = request_config(self, kwargs)
        if vd.uses_text(config):
            special = set(self.info.get_tokenizer().all_special_ids)
            kwargs[vd.QUERY_FIELD] = vd.instruction_ids(list(inputs.prompt), self.image_token_id(), special)
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def image_token_id(self) -> int:
        raise NotImplementedError

    def _call_hf_processor(self, hf_data, hf_kwargs):
        return self.with_fields(hf_kwargs, lambda kw: super(DropFields, self)._call_hf_processor(hf_data, kw))

    def with_fields(self, hf_kwargs, process):
        """``process`` (the stock HF processing) on ``hf_kwargs`` without flopwise's options, which come back
        as per-image fields of its output."""
        config = request_config(self, hf_kwargs)
        ours = (*vd.FIELDS, vd.QUERY_FIELD)
        out = process({k: v for k, v in hf_kwargs.items() if k not in ours})
        n = self._num_images(out)
        if n:
            out[vd.KEEP_FIELD] = torch.full((n,), config.keep, dtype=torch.float64)
            out[vd.METHOD_FIELD] = torch.full((n,), config.code, dtype=torch.int64)
            out[vd.LAYER_FIELD] = torch.full(
                (n,), -1 if config.layer is None else config.layer, dtype=torch.int64
            )
            if vd.QUERY_FIELD in hf_kwargs:
                ids = torch.tensor(list(hf_kwargs[vd.QUERY_FIELD]), dtype=torch.int64)
                out[vd.QUERY_FIELD] = ids[None].expand(n, -1).clone()
        return out

    def tower_layers(self) -> int | None:
        """Vision-tower layers a request may drop after (``visual_drop_layer``); None: not supported."""
        return None

    def _num_images(self, out) -> int:
        pv = out.get(self.image_key)
        return 0 if pv is None else len(pv)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        # keep_on_cpu: vLLM still sends such fields to the worker for an image whose placeholder is all a
        # prefix-cache hit (M-RoPE models compute positions from them); Qwen's positions need the options.
        for name in vd.FIELDS:
            fields[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        fields[vd.QUERY_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = []
        for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            if update.modality == "image" and isinstance(update, PromptReplacement):
                update = PromptReplacement(
                    "image", update.target, self._kept_replacement(update.replacement, out_mm_kwargs)
                )
            updates.append(update)
        return updates

    def _kept_replacement(self, full, out_mm_kwargs):
        def replacement(item_idx: int):
            tokens = full(item_idx)
            keep = _item_keep(out_mm_kwargs, item_idx)
            if keep is None:
                return tokens
            return tokens[: self.kept_count(len(tokens), keep, out_mm_kwargs["image"][item_idx])]

        return replacement

    def kept_count(self, tokens: int, keep: float, item) -> int:
        """LM tokens an image of ``tokens`` keeps at ``keep`` (``item``: its processor outputs)."""
        return vd.keep_count(tokens, keep)


def _item_keep(out_mm_kwargs, item_idx: int) -> float | None:
    items = out_mm_kwargs.get("image") if hasattr(out_mm_kwargs, "get") else None
    if not items:
        return None
    elem = items[item_idx].get(vd.KEEP_FIELD)
    return None if elem is None else float(elem.data)


def feature_config(data) -> vd.VisualDropConfig | None:
    """An image's options from its ``MultiModalFeatureSpec.data`` (None: the image carries none)."""
    if data is None or vd.KEEP_FIELD not in data:
        return None
    return vd.VisualDropConfig.from_code(*(data[name].data.item() for name in vd.FIELDS))


def configs(kwargs: dict) -> list[vd.VisualDropConfig] | None:
    """Each image's options, popped from ``embed_multimodal``'s kwargs (None: no image carries any)."""
    keep, code, layer = (kwargs.pop(f, None) for f in vd.FIELDS)
    if keep is None:
        return None
    return [
        vd.VisualDropConfig.from_code(float(k), int(c), int(lay))
        for k, c, lay in zip(_flat(keep), _flat(code), _flat(layer))
    ]


def queries(kwargs: dict, count: int) -> list[torch.Tensor | None]:
    """Each image's instruction ids (:data:`vd.QUERY_FIELD`), popped from the kwargs; None where absent."""
    ids = kwargs.pop(vd.QUERY_FIELD, None)
    if ids is None:
        return [None] * count
    rows = list(ids) if isinstance(ids, (list, tuple)) else list(ids.unbind(0))
    return [r.reshape(-1) for r in rows]


def _flat(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return [v for item in x for v in _flat(item)] if isinstance(x, (list, tuple)) else [x]
