"""Visual token dropping for LLaVA-NeXT (anyres: a base view + crops stitched into a grid, a newline after
each row): the layout against transformers' own packing, vLLM against the transformers reference (same
greedy answers, prompts and charge), and ``flopwise serve`` over HTTP."""

import base64
import gc
import io

import httpx
import numpy as np
import pytest
import torch

from flopwise.ledger import FlopModel
from flopwise.techniques import anyres
from flopwise.techniques import visual_drop as vd

# (width, height): one crop (square), 1x2 crops with no padding, 2x1 crops with padding cut away
SIZES = [(112, 112), (128, 64), (90, 200)]


def _image(seed: int, size: tuple[int, int]):
    from PIL import Image

    w, h = size
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _prompt(tokenizer, question="what is it?") -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>" + question}], tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def reference(tiny_model):
    import transformers

    path = tiny_model("llava-next")
    ref = transformers.LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref, transformers.AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("size", SIZES)
def test_layout_at_keep_1_is_transformers_packing(reference, size):
    """The reference's anyres layout (base view, then the unpadded grid row by row with newlines) equals
    transformers' ``pack_image_features``; at keep 0.25 it keeps that fraction of each region + every row."""
    from flopwise.hf import visual

    _, ref, processor = reference
    image, prompt = _image(0, size), _prompt(processor.tokenizer)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        packed = ref.model.get_image_features(
            inputs["pixel_values"],
            inputs["image_sizes"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    packed = torch.cat(list(getattr(packed, "pooler_output", packed)))
    image_id = ref.config.image_token_index
    whole = visual.prepare(ref, processor, image, prompt, vd.VisualDropConfig(keep=1.0))
    assert torch.equal(whole.embeds[0, inputs["input_ids"][0] == image_id], packed)
    cut = visual.prepare(ref, processor, image, prompt, vd.VisualDropConfig(keep=0.25, method="divprune"))
    hw = (size[1], size[0])
    grid = anyres.best_grid(hw, ref.config.image_grid_pinpoints, 64)
    tokens, rows = anyres.counts(hw, grid, 4)
    assert len(packed) == 16 + tokens + rows
    assert (
        cut.image_tokens
        == anyres.kept_tokens(hw, grid, 4, 16, 0.25)
        == 4 + vd.keep_count(tokens, 0.25) + rows
    )
    newline = ref.model.image_newline
    n_newlines = int((cut.embeds[0] == newline).all(-1).sum())
    assert n_newlines == rows  # every row still ends with its newline


@pytest.fixture(scope="module")
def engine(reference):
    from flopwise_serve.offline import LLM

    path, ref, processor = reference
    llm = LLM(path, dtype="float32", max_model_len=1024, max_num_seqs=8, limit_mm_per_prompt={"image": 1})
    yield llm, ref, processor, FlopModel.from_pretrained(path)
    llm.shutdown()
    del llm
    gc.collect()


def _request(processor, image, keep=None, method=None):
    req = {"prompt": _prompt(processor.tokenizer), "multi_modal_data": {"image": image}}
    kwargs = {k: v for k, v in zip(vd.FIELDS, (keep, method)) if v is not None}
    if kwargs:
        req["mm_processor_kwargs"] = kwargs
    return req


def _layout(ledger, size):
    hw = (size[1], size[0])
    grid = anyres.best_grid(hw, ledger.spec.extra["config"]["image_grid_pinpoints"], 64)
    return hw, grid, anyres.counts(hw, grid, 4)


@pytest.mark.slow
def test_engine_keeps_what_the_reference_keeps_and_charges_it(engine):
    """Each method on images of every layout, then one batch mixing ratios, sizes and a whole image: the
    engine's greedy tokens are the reference's, its prompt holds the kept tokens + newlines, and the tower
    is charged on the base view and each crop, the projector on the kept tokens only."""
    from vllm import SamplingParams

    from flopwise.hf import visual
    from flopwise_serve.offline import flops_of

    llm, ref, processor, ledger = engine
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompt = _prompt(processor.tokenizer)
    plan = [
        (size, keep, method)
        for size in SIZES[1:]
        for keep, method in ((0.25, "divprune"), (0.5, "visionzip"))
    ]
    plan += [(SIZES[0], 0.25, "cls_attention"), (SIZES[2], 0.25, "random"), (SIZES[1], 1.0, None)]
    outs = llm.generate([_request(processor, _image(i, s), k, m) for i, (s, k, m) in enumerate(plan)], greedy)
    for i, ((size, keep, method), out) in enumerate(zip(plan, outs)):
        config = vd.VisualDropConfig(keep=keep, method=method or "visiondrop")
        prepared = visual.prepare(ref, processor, _image(i, size), prompt, config)
        assert list(out.outputs[0].token_ids) == visual.greedy(ref, prepared, 5), (size, keep, method)
        assert len(out.prompt_token_ids) == prepared.embeds.shape[1]
        hw, grid, (tokens, rows) = _layout(ledger, size)
        crops = grid[0] * grid[1]
        projected = prepared.image_tokens - rows if keep < 1 else (1 + crops) * 16  # stock: every crop token
        usage = flops_of(out)
        assert usage["vision"] == ledger.vision(1, projected=projected, crops=crops).total, (size, keep)
        P = len(out.prompt_token_ids)
        assert (
            usage["language"]
            == ledger.forward(P, logits=1).total + ledger.forward(4, start=P, logits=4).total
        )


@pytest.mark.slow
def test_served_llava_next_drops_and_refuses_what_it_cannot(tiny_model, tmp_path):
    """``flopwise serve`` on LLaVA-NeXT: visual_keep shrinks the prompt and the charge; a method that reads
    the text and dropping inside the tower are 400s naming their field; the server keeps serving."""
    from flopwise_serve.launch import flopwise_server, free_port

    path = tiny_model("llava-next")
    args = ["--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 1}']
    with flopwise_server(path, free_port(), tmp_path / "server.log", args) as s:

        def chat(**extra):
            content = [
                {"type": "image_url", "image_url": {"url": _data_url(_image(6, (90, 200)))}},
                {"type": "text", "text": "hi"},
            ]
            body = {
                "model": path,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": content}],
                **extra,
            }
            return httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)

        full, cut = chat(), chat(visual_keep=0.25, visual_drop="divprune")
        assert full.status_code == cut.status_code == 200, (full.text, cut.text)
        f, c = full.json()["usage"], cut.json()["usage"]
        _, _, (tokens, rows) = _layout(FlopModel.from_pretrained(path), (90, 200))
        dropped = (16 + tokens) - (vd.keep_count(16, 0.25) + vd.keep_count(tokens, 0.25))
        assert f["prompt_tokens"] - c["prompt_tokens"] == dropped
        assert c["flops"]["vision"] < f["flops"]["vision"] and c["flops"]["language"] < f["flops"]["language"]
        for extra, field in (
            ({"visual_keep": 0.5, "visual_drop": "cdpruner"}, "visual_drop"),
            ({"visual_keep": 0.5, "visual_drop_layer": 1}, "visual_drop_layer"),
        ):
            r = chat(**extra)
            assert r.status_code == 400, r.text
            assert field in r.json()["error"]["message"], r.text  # raised in the processor: no param
        assert chat().status_code == 200
