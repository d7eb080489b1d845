"""Visual token dropping: the scoring methods, vLLM's LLaVA / Qwen2-VL subclasses against the transformers
reference (same kept tokens, same greedy answers), the ledger's charge, and ``flopwise serve`` over HTTP."""

import base64
import gc
import io

import httpx
import numpy as np
import pytest
import torch

from flopwise.ledger import FlopModel
from flopwise.techniques import visual_drop as vd

FAMILIES = ["llava", "qwen2-vl", "qwen2.5-vl"]
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDER = {"llava": "<image>", "qwen2-vl": QWEN_PLACEHOLDER, "qwen2.5-vl": QWEN_PLACEHOLDER}


# -- the methods (plain torch) --------------------------------------------------------------------
def _features(n=64, d=16, salient=(5, 17, 40)):
    """A flat background with a few distinct tokens: what a content-aware method must keep."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, d), 0.5) + 0.01 * torch.randn(n, d, generator=g)
    for i in salient:
        x[i] = 3 * torch.randn(d, generator=g)
    return x, sorted(salient)


@pytest.mark.parametrize("method", ["visiondrop", "cls_attention"])
def test_content_methods_keep_the_distinct_tokens(method):
    x, salient = _features()
    query = x[salient].mean(0) if method == "cls_attention" else None  # a CLS token that has seen the objects
    kept = vd.select(x, vd.VisualDropConfig(keep=3 / 64, method=method), query).kept
    assert kept.tolist() == salient


def test_divprune_keeps_one_of_each_kind_of_token():
    """Three objects of 5 near-identical tokens each on a background of 49: the 4 most diverse tokens are one
    of each object and one of the background, where a salience score would take tokens of one object."""
    g = torch.Generator().manual_seed(1)
    x = torch.full((64, 16), 0.5) + 0.01 * torch.randn(64, 16, generator=g)
    objects = {0: range(3, 8), 1: range(20, 25), 2: range(50, 55)}
    for rows in objects.values():
        x[list(rows)] = torch.randn(16, generator=g) * 3 + 0.01 * torch.randn(len(rows), 16, generator=g)
    kept = vd.select(x, vd.VisualDropConfig(keep=4 / 64, method="divprune")).kept.tolist()
    groups = [next((o for o, rows in objects.items() if i in rows), "bg") for i in kept]
    assert sorted(groups, key=str) == [0, 1, 2, "bg"], kept
    # the greedy max-min order: each next token is the farthest from those kept (checked by brute force)
    from flopwise.techniques.divprune import max_min_order

    order = max_min_order(x, 6).tolist()
    unit = torch.nn.functional.normalize(x, dim=-1)
    dist = 1 - unit @ unit.T
    for i in range(1, 6):
        nearest = dist[order[:i]].min(0).values
        nearest[order[:i]] = -1
        assert order[i] == int(nearest.argmax())


def test_visionzip_merges_the_rest_into_new_tokens():
    x, salient = _features()
    sel = vd.select(x, vd.VisualDropConfig(keep=8 / 64, method="visionzip"), x[salient].mean(0))
    assert len(sel.kept) == 8 and sel.kept.tolist() == sorted(sel.kept.tolist())
    assert set(salient) <= set(sel.kept.tolist())  # the dominant tokens (7 of the 8 slots)
    w = sel.weights
    merged = [i for i in range(8) if (w[i] > 0).sum() > 1]
    assert len(merged) == 1  # round(8 * 10 / 64) = 1 contextual token...
    (m,) = merged
    covered = (w[m] > 0).nonzero().flatten().tolist()
    # ...holding its target + the mean of every token not kept (one target: all are assigned to it)
    assert set(covered) == set(range(64)) - (set(sel.kept.tolist()) - {int(sel.kept[m])})
    expected = x[sel.kept[m]] + x[[i for i in covered if i != int(sel.kept[m])]].mean(0)
    assert torch.allclose(sel.take(x)[m], expected, atol=1e-5)
    others = [i for i in range(8) if i != m]
    assert torch.equal(sel.take(x)[others], x[sel.kept[others]])  # the dominant tokens are copies


def test_cdpruner_follows_the_instruction_and_stays_diverse():
    """Two objects (5 near-identical tokens each) on a background: an instruction close to one object's
    features puts that object first; the DPP's second token is not a copy of the first."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=g) * 0.05 + 1.0
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    x[10:15] = a + 0.01 * torch.randn(5, 16, generator=g)
    x[40:45] = b + 0.01 * torch.randn(5, 16, generator=g)
    config = vd.VisualDropConfig(keep=2 / 64, method="cdpruner")
    about_a, about_b = (vd.select(x, config, text=t[None]).kept.tolist() for t in (a, b))
    assert sum(10 <= i < 15 for i in about_a) == 1 and sum(40 <= i < 45 for i in about_b) == 1
    assert not any(40 <= i < 45 for i in about_a) and not any(10 <= i < 15 for i in about_b)
    from flopwise.techniques.cdpruner import greedy_map

    # greedy MAP = each step's largest log-determinant gain (checked by brute force on a small kernel)
    kernel = x[:12] @ x[:12].T / 16 + 0.1 * torch.eye(12)
    order = greedy_map(kernel, 4).tolist()
    for i in range(1, 4):
        subsets = {j: order[:i] + [j] for j in range(12) if j not in order[:i]}
        dets = {j: torch.logdet(kernel[s][:, s]) for j, s in subsets.items()}
        assert order[i] == max(dets, key=dets.get)


def test_instruction_ids_are_the_turn_around_the_image():
    special, image = {0, 1}, 9
    # <s> user : <image> what colour ? </s> <s> assistant  -> the ids around the image up to special ids
    prompt = [0, 5, 6, 9, 7, 8, 1, 0, 4]
    assert vd.instruction_ids(prompt, image, special) == [5, 6, 7, 8]
    expanded = [0, 5, 6, 9, 9, 9, 7, 8, 1, 0, 4]  # the processor's expanded placeholders: the same ids
    assert vd.instruction_ids(expanded, image, special) == [5, 6, 7, 8]
    assert vd.instruction_ids([0, 5, 1], image, special) == []


def test_baselines_are_content_blind_and_deterministic():
    x, _ = _features()
    uniform = vd.select(x, vd.VisualDropConfig(keep=0.25, method="uniform")).kept
    assert uniform.tolist() == list(range(0, 64, 4))  # evenly spread, every 4th token
    r1 = vd.select(x, vd.VisualDropConfig(keep=0.25, method="random")).kept
    r2 = vd.select(torch.randn(64, 16), vd.VisualDropConfig(keep=0.25, method="random")).kept
    assert r1.tolist() == r2.tolist() and len(set(r1.tolist())) == 16  # same subset whatever the content
    assert r1.tolist() == sorted(r1.tolist()) and r1.tolist() != uniform.tolist()


@pytest.mark.parametrize(
    "keep,n,expected", [(1.0, 576, 576), (0.25, 576, 144), (0.05, 576, 29), (0.05, 16, 1), (0.5, 7, 4)]
)
def test_keep_count(keep, n, expected):
    assert vd.keep_count(n, keep) == expected


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.25, 0.1, 0.05, 0.33])
def test_tokens_before_inverts_keep_count_from_below(keep):
    for n in range(1, 700):
        kept = vd.keep_count(n, keep) if round(keep * n) >= 1 else None
        if kept is not None:
            first = vd.tokens_before(kept, keep)
            assert first <= n and vd.keep_count(first, keep) == kept
            assert int(keep * (first - 1) + 0.5) < kept  # one fewer token would keep fewer


def test_a_ratio_that_keeps_no_token_is_an_error_naming_the_field():
    with pytest.raises(
        vd.VisualDropError, match="visual_keep=0.01 keeps no token of an image of 16 tokens"
    ) as e:
        vd.keep_count(16, 0.01)
    assert e.value.field == "visual_keep"


@pytest.mark.parametrize(
    "keep,method,field",
    [
        (0, None, "visual_keep"),
        (1.5, None, "visual_keep"),
        ("0.5", None, "visual_keep"),
        (True, None, "visual_keep"),
        (float("nan"), None, "visual_keep"),
        (0.5, "nope", "visual_drop"),
    ],
)
def test_bad_options_name_the_field(keep, method, field):
    with pytest.raises(vd.VisualDropError) as e:
        vd.parse_options(keep, method)
    assert e.value.field == field and field in str(e.value)


def test_server_defaults_apply_to_requests_that_set_none():
    from flopwise.options import Defaults, parse

    assert vd.parse_options() == vd.VisualDropConfig(keep=1.0, method="visiondrop")
    defaults = Defaults(visual_keep=0.25, visual_drop="uniform")
    assert parse({}, defaults).visual == vd.VisualDropConfig(keep=0.25, method="uniform")
    assert parse({"visual_keep": 0.5, "visual_drop": "random"}, defaults).visual == vd.VisualDropConfig(
        keep=0.5, method="random"
    )
    assert parse({"visual_keep": 1}, defaults).visual is None


def test_mrope_positions_keep_each_token_at_its_grid_place():
    # 5 text tokens, a 1x2x3 image grid, 4 text tokens.
    full, delta = vd.mrope_positions(15, [(5, (1, 2, 3), None)])
    grid = np.indices((1, 2, 3)).reshape(3, -1) + 5
    assert (full[:, :5] == np.arange(5)).all() and (full[:, 5:11] == grid).all()
    assert (
        full[:, 11:] == np.arange(4) + 8
    ).all() and delta == 12 - 15  # text resumes after the grid's max (7)
    kept, delta = vd.mrope_positions(11, [(5, (1, 2, 3), np.array([0, 4]))])
    assert (kept[:, 5:7] == grid[:, [0, 4]]).all()
    # text resumes after the whole grid (7), not after the highest kept position (6): where it would be
    # with every token kept, whichever were kept
    assert (kept[:, 7:] == np.arange(4) + 8).all() and delta == 12 - 11
    assert (kept[:, 7:] == full[:, 11:]).all()


# -- vLLM against the transformers reference --------------------------------------------------------
def _image(seed: int, size: int = 112):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def _prompt(tokenizer, family: str, question: str = "what is it?") -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": PLACEHOLDER[family] + question}],
        tokenize=False,
        add_generation_prompt=True,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tiny_model):
    import transformers

    from flopwise_serve.offline import LLM

    path = tiny_model(request.param)
    arch = transformers.AutoConfig.from_pretrained(path).architectures[0]
    ref = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    llm = LLM(path, dtype="float32", max_model_len=1024, max_num_seqs=8, limit_mm_per_prompt={"image": 1})
    yield request.param, llm, ref, processor, FlopModel.from_pretrained(path)
    llm.shutdown()
    del llm
    gc.collect()


def _request(family, processor, image, keep=None, method=None, question="what is it?", layer=None):
    req = {"prompt": _prompt(processor.tokenizer, family, question), "multi_modal_data": {"image": image}}
    kwargs = {k: v for k, v in zip(vd.FIELDS, (keep, method, layer)) if v is not None}
    if kwargs:
        req["mm_processor_kwargs"] = kwargs
    return req


def _greedy(n=6):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _full_tokens(family, processor, image) -> int:
    out = processor(text=[PLACEHOLDER[family]], images=[image], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>" if family == "llava" else "<|image_pad|>")
    return int((out["input_ids"] == image_id).sum())


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["visiondrop", "cls_attention", "divprune", "visionzip", "cdpruner", "uniform", "random"]
)
def test_engine_keeps_what_the_reference_keeps(vlm, method):
    family, llm, ref, processor, _ = vlm
    if method == "cdpruner" and family != "llava":
        pytest.skip("cdpruner reads the text: LLaVA only (Qwen refuses it, tested over HTTP)")
    from flopwise.hf import visual

    image = _image(1)
    full = _full_tokens(family, processor, image)
    baseline = llm.generate([_request(family, processor, image)], _greedy())[0]
    for keep in (0.5, 0.25):
        config = vd.VisualDropConfig(keep=keep, method=method)
        expected = visual.greedy(
            ref, visual.prepare(ref, processor, image, _prompt(processor.tokenizer, family), config), 6
        )
        out = llm.generate([_request(family, processor, image, keep, method)], _greedy())[0]
        assert list(out.outputs[0].token_ids) == expected, (keep, method)
        # the prompt really shrank: the placeholders are the kept tokens only
        assert len(out.prompt_token_ids) == len(baseline.prompt_token_ids) - full + vd.keep_count(full, keep)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 1])
def test_llava_drops_inside_the_tower_as_the_reference_does(vlm, layer):
    family, llm, ref, processor, ledger = vlm
    if family != "llava":
        pytest.skip("visual_drop_layer is LLaVA's")
    from flopwise.hf import visual
    from flopwise_serve.offline import flops_of

    image = _image(10)
    for method in ("visiondrop", "visionzip", "uniform"):  # visionzip: merged tokens run the later layers
        config = vd.VisualDropConfig(keep=0.25, method=method, layer=layer)
        expected = visual.greedy(
            ref, visual.prepare(ref, processor, image, _prompt(processor.tokenizer, family), config), 6
        )
        out = llm.generate([_request(family, processor, image, 0.25, method, layer=layer)], _greedy())[0]
        assert list(out.outputs[0].token_ids) == expected, method
        # the tower's later layers ran on the kept tokens: charged so, and less than dropping after the tower
        kept = vd.keep_count(ledger.tokens_per_image, 0.25)
        assert (
            flops_of(out)["vision"] == ledger.vision(1, tokens_per_image=kept, kept_after_layer=layer).total
        )
        assert flops_of(out)["vision"] < ledger.vision(1, tokens_per_image=kept).total
    # In one batch: an image dropped in the tower, one by cdpruner after it, one whole: each as alone.
    plan = [(0.25, "visiondrop", layer), (0.25, "cdpruner", None), (1.0, None, None)]
    requests = [_request(family, processor, image, k, m, layer=lay) for k, m, lay in plan]
    outs = llm.generate(requests, _greedy())
    for (keep, method, lay), out in zip(plan, outs):
        config = vd.VisualDropConfig(keep=keep, method=method or "visiondrop", layer=lay)
        prompt = _prompt(processor.tokenizer, family)
        expected = visual.greedy(ref, visual.prepare(ref, processor, image, prompt, config), 6)
        assert list(out.outputs[0].token_ids) == expected, (keep, method, lay)


@pytest.mark.slow
def test_mixed_ratios_in_one_batch_and_prefix_cache(vlm):
    """Requests with different keep ratios batched together (and the same image seen again, so its
    encoder output and prompt blocks may come from caches) answer as each does alone in the reference."""
    family, llm, ref, processor, _ = vlm
    from flopwise.hf import visual

    image, other = _image(2), _image(3)
    plan = [(image, 1.0), (image, 0.25), (other, 0.5), (image, 0.25), (image, 1.0), (other, 0.5)]
    outs = llm.generate([_request(family, processor, im, keep) for im, keep in plan], _greedy())
    for (im, keep), out in zip(plan, outs):
        config = vd.VisualDropConfig(keep=keep)
        expected = visual.greedy(
            ref, visual.prepare(ref, processor, im, _prompt(processor.tokenizer, family), config), 6
        )
        assert list(out.outputs[0].token_ids) == expected, keep
    # A prompt over one 128-token block, twice: the second run's first block comes from the prefix cache (its
    # image tokens are the kept ones, keyed by the image and visual_keep) and still answers as the reference.
    question = "what is it? describe the shapes, their colours and where they are. " * 12
    long = _request(family, processor, image, 0.25, question=question)
    first, again = (llm.generate([long], _greedy())[0] for _ in range(2))
    assert (
        len(again.prompt_token_ids) > 128 and again.num_cached_tokens >= 128 and not first.num_cached_tokens
    )
    config = vd.VisualDropConfig(keep=0.25)
    prompt = _prompt(processor.tokenizer, family, question)
    expected = visual.greedy(ref, visual.prepare(ref, processor, image, prompt, config), 6)
    assert list(first.outputs[0].token_ids) == expected
    assert list(again.outputs[0].token_ids) == expected


@pytest.mark.slow
def test_ledger_charges_the_whole_encoder_and_only_kept_tokens(vlm):
    from flopwise_serve.offline import flops_of

    family, llm, _, processor, ledger = vlm
    image = _image(4)
    full = _full_tokens(family, processor, image)
    outs = llm.generate([_request(family, processor, image, keep) for keep in (1.0, 0.25)], _greedy(4))
    usages = [flops_of(o) for o in outs]
    for out, usage, keep in zip(outs, usages, (1.0, 0.25)):
        P, kept = len(out.prompt_token_ids), vd.keep_count(full, keep)
        # LLaVA prunes before its projector (projector on kept tokens); Qwen2-VL merges the whole grid first.
        if family == "llava":
            vision = ledger.vision(1, tokens_per_image=kept).total
        else:  # the image's grid sets Qwen2.5-VL's attention windows
            t, h, w = processor(text=["x"], images=[image])["image_grid_thw"][0].tolist()
            vision = ledger.vision(1, tokens_per_image=full, grid=(t, h // 2, w // 2)).total
        lm = ledger.forward(P, start=0, logits=1).total + ledger.forward(3, start=P, logits=3).total
        assert usage["vision"] == vision
        assert usage["language"] == lm
        assert usage["total"] == vision + lm
    if family != "llava":
        assert usages[0]["vision"] == usages[1]["vision"]  # the encoder ran on the whole image both times
    assert len(outs[0].prompt_token_ids) - len(outs[1].prompt_token_ids) == full - vd.keep_count(full, 0.25)
    assert usages[1]["language"] < usages[0]["language"]
    # the dense baseline of the cut request is exactly what the full one cost: dropping shows as saved FLOPs
    assert usages[0]["dense_baseline"] == usages[0]["total"]
    assert usages[1]["dense_baseline"] == usages[0]["total"] > usages[1]["total"]


# -- flopwise serve over HTTP --------------------------------------------------------------------------
def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module", params=FAMILIES)
def vlm_server(request, tiny_model, tmp_path_factory):
    from openai import OpenAI

    from flopwise_serve.launch import flopwise_server, free_port

    path = tiny_model(request.param)
    log = tmp_path_factory.mktemp("vlm-server") / "server.log"
    with flopwise_server(
        path,
        free_port(),
        log,
        ["--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 1}', "--visual-drop", "visiondrop"],
    ) as s:
        client = OpenAI(base_url=f"{s.url}/v1", api_key="none", timeout=60, max_retries=0)
        client.model_id = client.models.list().data[0].id
        client.ledger = FlopModel.from_pretrained(path)
        yield request.param, s, client


def _chat(family, client, image, **extra):
    content = [
        {"type": "image_url", "image_url": {"url": _data_url(image)}},
        {"type": "text", "text": "what is it?"},
    ]
    return client.chat.completions.create(
        model=client.model_id,
        messages=[{"role": "user", "content": content}],
        max_tokens=4,
        temperature=0,
        extra_body=extra or None,
    )


@pytest.mark.slow
def test_served_image_requests_use_fewer_tokens_and_report_vision_flops(vlm_server):
    family, _, client = vlm_server
    image = _image(5, 224)
    full = _chat(family, client, image)
    cut = _chat(family, client, image, visual_keep=0.25)
    via_mm = _chat(family, client, image, mm_processor_kwargs={"visual_keep": 0.25})
    via_xargs = _chat(family, client, image, vllm_xargs={"visual_keep": 0.25})
    assert cut.usage.prompt_tokens < full.usage.prompt_tokens
    assert via_mm.usage.prompt_tokens == via_xargs.usage.prompt_tokens == cut.usage.prompt_tokens
    assert via_mm.choices[0].message.content == cut.choices[0].message.content
    f, c = full.usage.flops, cut.usage.flops
    assert f["vision"] > 0 and f["language"] > 0 and f["total"] == f["vision"] + f["language"]
    assert c["language"] < f["language"] and c["total"] < f["total"]
    for method in ("divprune", "visionzip", "cdpruner"):
        if method == "cdpruner" and family != "llava":
            continue  # refused: test_bad_visual_options_are_400_naming_the_field
        other = _chat(family, client, image, visual_keep=0.25, visual_drop=method)
        assert other.usage.prompt_tokens == cut.usage.prompt_tokens, method
        if family == "llava":  # the projector ran on the kept tokens, on every token for cdpruner
            full_n = _full_tokens_served(family, full, cut)
            kept = vd.keep_count(full_n, 0.25)
            projected = full_n if method == "cdpruner" else None
            vision = client.ledger.vision(1, tokens_per_image=kept, projected=projected).total
            assert other.usage.flops["vision"] == vision, method


@pytest.mark.slow
def test_budget_admission_counts_the_tower_and_the_kept_tokens(vlm_server):
    family, _, client = vlm_server
    image, ledger = _image(8, 224), client.ledger
    full, cut = _chat(family, client, image), _chat(family, client, image, visual_keep=0.25)
    vision = cut.usage.flops["vision"]
    need = {
        name: ledger.forward(r.usage.prompt_tokens, logits=1).total + vision
        for name, r in (("full", full), ("cut", cut))
    }
    if family == "llava":  # its projector runs on the kept tokens only
        need["full"] += full.usage.flops["vision"] - vision
    budget = (need["full"] + need["cut"]) // 2  # covers the cut request's prefill, not the full one's
    with pytest.raises(Exception) as e:
        _chat(family, client, image, flop_budget=budget)
    assert e.value.status_code == 400 and "1 image" in str(e.value)
    ok = _chat(family, client, image, visual_keep=0.25, flop_budget=budget)
    assert ok.usage.flops["total"] <= budget and ok.usage.flops["budget"] == budget
    # Admission's own figure: Qwen2-VL's grid is no longer visible in the front end, so it takes the fewest
    # tokens that leave these placeholders at keep 0.25 (never refusing what fits; the engine gate does the
    # rest).
    placeholders = cut.usage.prompt_tokens - (
        full.usage.prompt_tokens - _full_tokens_served(family, full, cut)
    )
    tower = vd.tokens_before(placeholders, 0.25) if family != "llava" else placeholders
    admission = (
        ledger.forward(cut.usage.prompt_tokens, logits=1).total
        + ledger.vision(1, tokens_per_image=tower).total
    )
    with pytest.raises(Exception) as e:
        _chat(family, client, image, visual_keep=0.25, flop_budget=admission - 1)
    assert e.value.status_code == 400 and f"needs {admission:,} FLOPs" in str(e.value)


def _full_tokens_served(family, full, cut) -> int:
    """Image tokens of the full request, from the prompt lengths of a full and a keep-0.25 request."""
    diff = full.usage.prompt_tokens - cut.usage.prompt_tokens  # = n - round(n / 4)
    return next(n for n in range(diff, 4 * diff + 4) if n - vd.keep_count(n, 0.25) == diff)


BAD = [
    ({"visual_keep": 0}, "visual_keep"),
    ({"visual_keep": 1.5}, "visual_keep"),
    ({"visual_keep": "x"}, "visual_keep"),
    ({"visual_drop": "nope"}, "visual_drop"),
    ({"vllm_xargs": {"visual_keep": -1}}, "vllm_xargs.visual_keep"),
    ({"mm_processor_kwargs": {"visual_keep": 2}}, "mm_processor_kwargs.visual_keep"),
    ({"mm_processor_kwargs": {"max_pixels": 10**8}}, "mm_processor_kwargs"),
    ({"visual_drop_layer": -1}, "visual_drop_layer"),
    ({"visual_drop_layer": 1.5}, "visual_drop_layer"),
]


@pytest.mark.slow
def test_bad_visual_options_are_400_naming_the_field(vlm_server):
    family, s, client = vlm_server
    url = _data_url(_image(6))
    for extra, param in BAD:
        body = {
            "model": client.model_id,
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
            **extra,
        }
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == param and param.split(".")[-1] in err["message"], (extra, err)
    # a ratio that keeps no token of this image, a tower layer the model lacks (Qwen2-VL: none), a method that
    # reads the text where the family cannot (Qwen2-VL) or inside the tower, and an image that does not decode
    text_method = {"visual_keep": 0.5, "visual_drop": "cdpruner"}
    for extra, content_url, needle in (
        ({"visual_keep": 0.001}, url, "visual_keep"),
        ({"visual_keep": 0.5, "visual_drop_layer": 9}, url, "visual_drop_layer"),
        (text_method if family != "llava" else {**text_method, "visual_drop_layer": 1}, url, "cdpruner"),
        ({}, "data:image/png;base64,bm90IGFuIGltYWdl", "image"),
    ):
        body = {
            "model": client.model_id,
            "max_tokens": 2,
            **extra,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": content_url}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
        }
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"].lower()
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    assert _chat(family, client, _image(7), visual_keep=0.5).choices[0].finish_reason == "length"


@pytest.mark.slow
@pytest.mark.long  # a server of its own for an error path (~50 s); the anyres families took the suite's time
def test_a_family_flopwise_cannot_prune_is_a_400_naming_it(tiny_model, tmp_path):
    """Qwen3-VL (deepstack): ``vllm serve`` with flopwise's plugins serves it as stock vLLM does
    (``flopwise serve`` refuses a model the ledger cannot cost); asking to drop its image tokens is refused
    with the architecture named, not silently ignored. (Without the endpoint plugin allow-listed, plain
    ``vllm serve`` hands the options to the stock processor, which ignores them.)"""
    from flopwise_serve.launch import free_port, vllm_serve

    path = tiny_model("qwen3-vl")
    args = ["--max-model-len", "1024", "--trust-request-mm-kwargs"]
    with vllm_serve(
        path, free_port(), tmp_path / "server.log", args, plugins="flopwise,flopwise_serving"
    ) as s:
        for extra, status in (
            ({"mm_processor_kwargs": {"visual_keep": 0.5}}, 400),
            ({"vllm_xargs": {"visual_keep": 0.5}}, 400),
            ({}, 200),
        ):
            body = {
                "model": path,
                "max_tokens": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": _data_url(_image(6, 96))}},
                            {"type": "text", "text": "hi"},
                        ],
                    }
                ],
                **extra,
            }
            r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == status, (extra, r.text)
            if status == 400:
                err = r.json()["error"]
                assert "visual_keep" in err["param"] and "Qwen3VLForConditionalGeneration" in err["message"]


@pytest.mark.slow
@pytest.mark.long  # a Qwen2-VL engine of its own, ~1.5 min; the served and engine tests stay in make test
def test_batch_lines_take_visual_keep(tiny_model, tmp_path):
    import json
    import subprocess
    import sys

    url = _data_url(_image(9, 224))
    lines = []
    for i, extra in enumerate([{}, {"visual_keep": 0.25}, {"visual_keep": 0}]):
        body = {
            "max_tokens": 3,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
            **extra,
        }
        lines.append(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flopwise_serve.cli",
            "batch",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "out.jsonl"),
            "--model",
            tiny_model("qwen2-vl"),
            "--max-model-len",
            "1024",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1 and "1 of 3 lines failed" in r.stderr, r.stderr[-3000:]  # r2's bad visual_keep
    out = {
        rec["custom_id"]: rec for rec in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    }
    full, cut = (out[k]["response"]["body"]["usage"] for k in ("r0", "r1"))
    assert (
        cut["prompt_tokens"] < full["prompt_tokens"] and cut["flops"]["language"] < full["flops"]["language"]
    )
    assert cut["flops"]["vision"] == full["flops"]["vision"]  # Qwen2-VL's tower runs on the whole image
    assert out["r2"]["error"]["status_code"] == 400 and "visual_keep" in out["r2"]["error"]["message"]
