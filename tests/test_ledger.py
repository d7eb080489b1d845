"""The ledger against FlopCounterMode over real HF forward passes, and its own arithmetic."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flopwise.hf.tiny import FAMILIES
from flopwise.ledger import FlopModel, LedgerError, UnsupportedArchitecture, context_sum

PROMPT, DECODE_STEPS = 24, 4
IMAGE_SIDE = {"qwen2-vl": 56, "qwen2.5-vl": 112}  # pixels; the others' images are fixed by their config


def _hf_model(cfg: dict):
    import transformers

    arch = cfg["architectures"][0]
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)._from_config(config, attn_implementation="eager")
    if config.model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        # The default grouped_mm experts path is invisible to FlopCounterMode: use the eager loop.
        model.set_experts_implementation("eager")
    return model.eval()


def _inputs(family: str, ledger: FlopModel):
    """Token ids (and pixels for VLMs) for a prompt of PROMPT text tokens plus one image if the model takes
    one."""
    ids = torch.randint(10, 2000, (1, PROMPT))
    if family == "llava":
        n = ledger.tokens_per_image
        ids = torch.cat(
            [ids[:, :2], torch.full((1, n), FAMILIES["llava"]["image_token_index"]), ids[:, 2:]], 1
        )
        return ids, {"pixel_values": torch.randn(1, 3, 64, 64)}
    if family in ("qwen2-vl", "qwen2.5-vl"):
        # IMAGE_SIDE pixels -> side/14 patches a side, merged 2x2 (Qwen2.5-VL: 4x4 LM tokens, 4 windows)
        n, patches = ledger.tokens_per_image, IMAGE_SIDE[family] // 14
        image_id = FAMILIES[family]["image_token_id"]
        ids = torch.cat(
            [ids[:, :2], torch.tensor([[4]]), torch.full((1, n), image_id), torch.tensor([[5]]), ids[:, 2:]],
            1,
        )
        extra = {
            "pixel_values": torch.randn(patches * patches, 3 * 2 * 14 * 14),
            "image_grid_thw": torch.tensor([[1, patches, patches]]),
            "mm_token_type_ids": (ids == image_id).long(),
        }
        return ids, extra
    return ids, {}


def _counted(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"llava-next", "llava-onevision"}))  # anyres: below
def test_ledger_matches_flop_counter(family):
    cfg = json.loads(json.dumps(FAMILIES[family]))
    ledger = FlopModel.from_pretrained(cfg, image_size=IMAGE_SIDE.get(family, 56))
    model = _hf_model(cfg)
    ids, extra = _inputs(family, ledger)
    images = 1 if ledger.spec.vision else 0
    with torch.no_grad():
        # logits_to_keep=1: the LM head only where an engine computes logits.
        prefill, out = _counted(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra))
        cache, token, decode = out.past_key_values, out.logits[:, -1:].argmax(-1), 0
        for _ in range(DECODE_STEPS):
            flops, out = _counted(
                lambda token=token, cache=cache: model(
                    input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1
                )
            )
            cache, token, decode = out.past_key_values, out.logits[:, -1:].argmax(-1), decode + flops

    P = ids.shape[1]
    text_tokens = P - (images * ledger.tokens_per_image if images else 0)  # Qwen2-VL adds vision start/end
    cost = ledger.request(text_tokens, DECODE_STEPS + 1, images=images)
    assert cost.prompt_tokens == P

    # Conventions differ in two places, both written out here:
    # 1. eager prefill attention computes the full P x P score and value products; the ledger counts the
    #    causal triangle the engine computes: 2 products x 2 FLOPs x q_heads x head_dim x (P^2 - P(P+1)/2).
    square = sum(
        4 * layer.q_heads * layer.head_dim * (P * P - P * (P + 1) // 2) for layer in ledger.spec.layers
    )
    # 2. HF's LLaVA runs the whole CLIP tower; vLLM stops at the feature layer (-2), one layer earlier.
    extra_vision = 0
    if family == "llava":
        v = ledger.spec.vision
        s, E, F = v.patches + 1, v.hidden, v.ffn
        extra_vision = 2 * s * E * 3 * E + 4 * s * s * E + 2 * s * E * E + 4 * s * E * F
    expected_prefill = cost.prefill.total + square + extra_vision
    assert abs(prefill - expected_prefill) <= 0.02 * expected_prefill, (prefill, expected_prefill)
    # Decode steps attend from one query to the cache: no square, the counts agree as they are.
    assert abs(decode - cost.decode.total) <= 0.02 * cost.decode.total, (decode, cost.decode.total)
    # Within 2% is the bar; on these shapes the agreement is in fact exact.
    assert prefill == expected_prefill and decode == cost.decode.total


@pytest.mark.parametrize(
    "family,size",  # (h, w): crops 1x2 (no padding); 2x1 with padding; 4x4 (OneVision shrinks that grid)
    [
        ("llava-next", (64, 128)),
        ("llava-next", (200, 90)),
        ("llava-onevision", (200, 90)),
        ("llava-onevision", (250, 250)),
    ],
)
def test_anyres_vision_matches_flop_counter(family, size):
    """LLaVA-NeXT's / -OneVision's tower runs on the base view and each crop; stock projects every crop's
    tokens (OneVision's bilinear shrinking of a large grid is not counted: no matmul)."""
    from flopwise.techniques import anyres

    cfg = json.loads(json.dumps(FAMILIES[family]))
    ledger, model = FlopModel.from_pretrained(cfg), _hf_model(cfg)
    v = ledger.spec.vision
    grid = anyres.best_grid(size, cfg["image_grid_pinpoints"], 64)
    crops = grid[0] * grid[1]
    pixels = torch.randn(1 + crops, 3, 64, 64)
    flops, _ = _counted(
        lambda: model.model.get_image_features(
            pixels[None],
            torch.tensor([size]),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    )
    s, E, F = v.patches + 1, v.hidden, v.ffn  # HF runs the tower's last layer too (vLLM stops before it)
    extra = (1 + crops) * (2 * s * E * 3 * E + 4 * s * s * E + 2 * s * E * E + 4 * s * E * F)
    charged = ledger.vision(1, projected=(1 + crops) * v.tokens_per_image, crops=crops).total
    assert flops == charged + extra
    assert ledger.vision(1).total < charged  # the front end's least: the fewest crops any image has


def test_request_is_sum_of_engine_steps():
    """The closed form equals one prefill forward plus O-1 single-token decode forwards, step by step."""
    m = FlopModel.from_pretrained(FAMILIES["qwen2-moe"])
    P, O, cached = 300, 17, 128
    steps = m.forward(P - cached, start=cached, logits=1)
    for j in range(1, O):
        steps += m.forward(1, start=P + j - 1, logits=1)
    cost = m.request(P, O, cached_tokens=cached)
    assert cost.total == steps.total
    assert (cost.prefill + cost.decode).as_dict() == steps.as_dict()
    # Cached tokens save exactly their linear work and their own attention rows.
    assert m.request(P, O).total - cost.total == m.forward(cached, start=0, logits=0).total


@pytest.mark.parametrize(
    "start,tokens,window", [(0, 10, None), (5, 7, None), (0, 10, 4), (3, 9, 6), (20, 5, 8), (0, 1, 1)]
)
def test_context_sum_matches_brute_force(start, tokens, window):
    brute = sum(min(i + 1, window) if window else i + 1 for i in range(start, start + tokens))
    assert context_sum(start, tokens, window) == brute


def test_fewer_query_heads_cut_attention_in_proportion():
    full = FlopModel.from_pretrained(FAMILIES["llama-gqa"]).request(1000, 10).as_dict()["components"]
    sqa = FlopModel.from_pretrained(FAMILIES["llama-sqa"]).request(1000, 10).as_dict()["components"]
    assert sqa["attention"] * 2 == full["attention"]  # 4 -> 2 query heads
    assert sqa["o_proj"] * 2 == full["o_proj"]
    assert sqa["mlp"] == full["mlp"]


def test_moe_charges_active_experts_only():
    cfg = dict(FAMILIES["mixtral"])
    one = FlopModel.from_pretrained({**cfg, "num_experts_per_tok": 1}).forward(10).as_dict()
    two = FlopModel.from_pretrained(cfg).forward(10).as_dict()
    assert two["experts"] == 2 * one["experts"]
    assert two["router"] == one["router"] == 2 * 10 * 128 * 4 * 2  # T x D x E x 2 FLOPs x 2 layers


def test_smollm2_shapes():
    """SmolLM2-135M: 30 layers, hidden 576, 9 query / 3 KV heads of 64, FFN 1536, vocab 49152."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
    }
    f = FlopModel.from_pretrained(cfg).forward(1, start=0, logits=1).as_dict()
    non_embedding_params = 30 * (576 * 64 * (9 + 2 * 3) + 9 * 64 * 576 + 3 * 576 * 1536)
    assert f["qkv"] + f["o_proj"] + f["mlp"] == 2 * non_embedding_params
    assert f["lm_head"] == 2 * 576 * 49152


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}, "GPT2LMHeadModel"),
        ({"model_type": "llama"}, "architectures"),
        ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "vocab_size": 10}, "num_hidden_layers"),
        ({**FAMILIES["llama-gqa"], "num_attention_heads": 0}, "num_attention_heads"),
        ({**FAMILIES["llama-gqa"], "num_key_value_heads": 3}, "multiple"),
        ({**FAMILIES["mixtral"], "num_local_experts": None}, "num_local_experts"),
    ],
)
def test_bad_configs_name_the_problem(cfg, match):
    with pytest.raises(LedgerError, match=match):
        FlopModel.from_pretrained(cfg)


def test_unsupported_is_its_own_error():
    with pytest.raises(UnsupportedArchitecture):
        FlopModel.from_pretrained({"architectures": ["FalconForCausalLM"]})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt_tokens=0, output_tokens=1), "prompt_tokens"),
        (dict(prompt_tokens=5, output_tokens=0), "output_tokens"),
        (dict(prompt_tokens=5.5, output_tokens=1), "prompt_tokens"),
        (dict(prompt_tokens=True, output_tokens=1), "prompt_tokens"),
        (dict(prompt_tokens=5, output_tokens=1, cached_tokens=5), "cached_tokens"),
        (dict(prompt_tokens=5, output_tokens=1, images=1), "vision tower"),
    ],
)
def test_bad_token_counts(kwargs, match):
    with pytest.raises(LedgerError, match=match):
        FlopModel.from_pretrained(FAMILIES["llama-gqa"]).request(**kwargs)


def test_explicit_context_path_agrees_with_the_causal_default():
    """A technique passes the attention context it kept; given the full causal context it changes nothing."""
    m = FlopModel.from_pretrained(FAMILIES["qwen2-moe"])
    full = m.forward(9, start=40, logits=1)
    per_layer = [context_sum(40, 9)] * m.spec.num_layers
    assert m.forward(9, start=40, logits=1, context=per_layer).as_dict() == full.as_dict()
    shorter = m.forward(9, start=40, logits=1, context=100)
    layer = m.spec.layers[0]
    saved = 4 * layer.q_heads * layer.head_dim * (context_sum(40, 9) - 100) * m.spec.num_layers
    assert full.total - shorter.total == saved
    with pytest.raises(LedgerError, match="entries"):
        m.forward(9, context=[1, 2, 3])
