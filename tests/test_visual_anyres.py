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

# (width, height): one crop (square), 1x2 crops with no padding, 2x1 crops with padding cut away; for
# OneVision also 4x4 crops, whose grid it shrinks to ~9 crops' worth of tokens
SIZES = [(112, 112), (128, 64), (90, 200)]
FAMILIES = {"llava-next": SIZES, "llava-onevision": [*SIZES, (250, 250)]}
ARCH = {
    "llava-next": "LlavaNextForConditionalGeneration",
    "llava-onevision": "LlavaOnevisionForConditionalGeneration",
}


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


@pytest.fixture(scope="module", params=list(FAMILIES))
def reference(request, tiny_model):
    import transformers

    path = tiny_model(request.param)
    ref = getattr(transformers, ARCH[request.param]).from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, ref, transformers.AutoProcessor.from_pretrained(path)


def _layout(cfg, size):
    """(grid, grid tokens, rows) of an image of ``size`` (width, height) under an HF config."""
    v = cfg.vision_config
    aspect = getattr(cfg, "vision_aspect_ratio", None)
    return anyres.layout((size[1], size[0]), cfg.image_grid_pinpoints, v.image_size, v.patch_size, aspect)


def test_layout_is_transformers_packing(reference):
    """flopwise's anyres layout (base view, then the unpadded grid row by row, each row closed by a newline;
    OneVision's shrunk where large) is transformers' own packing; at keep 0.25 the reference keeps that
    fraction of each region and every row's newline."""
    from flopwise.hf import visual

    family, _, ref, processor = reference
    prompt, newline = _prompt(processor.tokenizer), ref.model.image_newline
    for size in FAMILIES[family]:
        image = _image(0, size)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            packed = ref.model.get_image_features(
                inputs["pixel_values"],
                inputs["image_sizes"],
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )
        packed = torch.cat(list(getattr(packed, "pooler_output", packed)))
        _, tokens, rows = _layout(ref.config, size)
        cols = tokens // rows
        assert len(packed) == 16 + tokens + rows and tokens == rows * cols, size
        is_newline = (packed == newline).all(-1).nonzero().flatten().tolist()
        assert is_newline == [16 + r * (cols + 1) + cols for r in range(rows)], size
        whole = visual.prepare(ref, processor, image, prompt, vd.VisualDropConfig(keep=1.0))
        image_id = ref.config.image_token_index
        assert torch.equal(whole.embeds[0, inputs["input_ids"][0] == image_id], packed), size
        cut = visual.prepare(ref, processor, image, prompt, vd.VisualDropConfig(keep=0.25, method="divprune"))
        assert cut.image_tokens == anyres.kept_tokens(tokens, rows, 16, 0.25), size
        assert cut.image_tokens == 4 + vd.keep_count(tokens, 0.25) + rows
        assert int((cut.embeds[0] == newline).all(-1).sum()) == rows, size  # every row still ends


@pytest.fixture(scope="module")
def engine(reference):
    from flopwise_serve.offline import LLM

    family, path, ref, processor = reference
    llm = LLM(path, dtype="float32", max_model_len=1024, max_num_seqs=8, limit_mm_per_prompt={"image": 1})
    yield family, llm, ref, processor, FlopModel.from_pretrained(path)
    llm.shutdown()
    del llm
    gc.collect()


def _request(processor, image, keep=None, method=None):
    req = {"prompt": _prompt(processor.tokenizer), "multi_modal_data": {"image": image}}
    kwargs = {k: v for k, v in zip(vd.FIELDS, (keep, method)) if v is not None}
    if kwargs:
        req["mm_processor_kwargs"] = kwargs
    return req


@pytest.mark.slow
def test_engine_keeps_what_the_reference_keeps_and_charges_it(engine):
    """Methods on images of every layout in one batch, with a whole image among them: the engine's greedy
    tokens are the reference's, its prompt holds the kept tokens + newlines, and the tower is charged on
    the base view and each crop; the projector on the kept tokens (NeXT) or on every token (OneVision,
    which drops after it, as stock vLLM projects them)."""
    from vllm import SamplingParams

    from flopwise.hf import visual
    from flopwise_serve.offline import flops_of

    family, llm, ref, processor, ledger = engine
    sizes = FAMILIES[family]
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompt = _prompt(processor.tokenizer)
    plan = [
        (size, keep, method)
        for size in sizes[1:]
        for keep, method in ((0.25, "divprune"), (0.5, "visionzip"))
    ]
    plan += [(sizes[0], 0.25, "cls_attention"), (sizes[2], 0.25, "random"), (sizes[1], 1.0, None)]
    outs = llm.generate([_request(processor, _image(i, s), k, m) for i, (s, k, m) in enumerate(plan)], greedy)
    for i, ((size, keep, method), out) in enumerate(zip(plan, outs)):
        config = vd.VisualDropConfig(keep=keep, method=method or "visiondrop")
        prepared = visual.prepare(ref, processor, _image(i, size), prompt, config)
        assert list(out.outputs[0].token_ids) == visual.greedy(ref, prepared, 5), (size, keep, method)
        assert len(out.prompt_token_ids) == prepared.embeds.shape[1]
        grid, _, rows = _layout(ref.config, size)
        crops = grid[0] * grid[1]
        projected = (1 + crops) * 16  # stock: every crop's tokens
        if keep < 1 and family == "llava-next":
            projected = prepared.image_tokens - rows
        usage = flops_of(out)
        assert usage["vision"] == ledger.vision(1, projected=projected, crops=crops).total, (size, keep)
        P = len(out.prompt_token_ids)
        language = ledger.forward(P, logits=1).total + ledger.forward(4, start=P, logits=4).total
        assert usage["language"] == language


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
        import transformers

        _, tokens, rows = _layout(transformers.AutoConfig.from_pretrained(path), (90, 200))
        dropped = (16 + tokens) - (vd.keep_count(16, 0.25) + vd.keep_count(tokens, 0.25))
        assert f["prompt_tokens"] - c["prompt_tokens"] == dropped
        assert c["flops"]["vision"] < f["flops"]["vision"] and c["flops"]["language"] < f["flops"]["language"]
        # Admission counts the least an image can cost (the front end no longer sees its size: the fewest
        # crops, one token projected): exactly that is admitted, one FLOP less refused.
        ledger = FlopModel.from_pretrained(path)
        least = (
            ledger.forward(c["prompt_tokens"], logits=1).total + ledger.vision(1, tokens_per_image=1).total
        )
        assert least < c["flops"]["total"]
        budgeted = [chat(visual_keep=0.25, visual_drop="divprune", flop_budget=b) for b in (least, least - 1)]
        assert budgeted[0].status_code == 200, budgeted[0].text
        assert budgeted[1].status_code == 400 and f"needs {least:,} FLOPs" in budgeted[1].text
        for extra, field in (
            ({"visual_keep": 0.5, "visual_drop": "cdpruner"}, "visual_drop"),
            ({"visual_keep": 0.5, "visual_drop_layer": 1}, "visual_drop_layer"),
        ):
            r = chat(**extra)
            assert r.status_code == 400, r.text
            assert field in r.json()["error"]["message"], r.text  # raised in the processor: no param
        assert chat().status_code == 200
