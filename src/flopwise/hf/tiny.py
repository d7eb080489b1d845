"""Tiny random models of every family the ledger supports (and, in ``UNSUPPORTED``, of a VLM it does not),
with a tokenizer trained in a second.

Used by the tests, the benchmarks' smoke runs and anyone who wants a model that loads in vLLM in
seconds. Shapes respect vLLM's CPU attention backend (head_dim 32 or more).
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB = 2048

_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    vocab_size=VOCAB,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)


def _qwen_vl(model_type: str, interleaved: bool = False, **vision) -> dict:
    """What the tiny Qwen VL families share: special token ids, an M-RoPE text model, the patch layout (14
    pixels, 2 frames, 2x2 merged into one LM token) under the family's own ``vision`` fields.
    ``interleaved``: Qwen3-VL's M-RoPE, read from ``rope_parameters`` alone."""
    mrope = [4, 6, 6]  # t, h, w sections of head_dim / 2
    rope = {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0}
    if interleaved:
        rope_fields = dict(rope_parameters=dict(rope, mrope_interleaved=True))
    else:
        rope_fields = dict(rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_parameters=rope)
    return dict(
        model_type=model_type,
        image_token_id=6,
        video_token_id=7,
        vision_start_token_id=4,
        vision_end_token_id=5,
        tie_word_embeddings=False,
        text_config=dict(
            _TEXT,
            model_type=f"{model_type}_text",
            **rope_fields,
        ),
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    )


FAMILIES: dict[str, dict] = {
    "llama-gqa": dict(_TEXT, architectures=["LlamaForCausalLM"], model_type="llama"),
    "qwen2-gqa": dict(_TEXT, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "mistral": dict(_TEXT, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    # Fewer query heads than hidden/head_dim: the shape query-head-reduced (SQA) checkpoints have.
    "llama-sqa": dict(_TEXT, architectures=["LlamaForCausalLM"], model_type="llama", num_attention_heads=2),
    "mixtral": dict(
        _TEXT,
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen2-moe": dict(
        _TEXT,
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        norm_topk_prob=False,
    ),
    "qwen3-moe": dict(
        _TEXT,
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    ),
    "llava": dict(
        architectures=["LlavaForConditionalGeneration"],
        model_type="llava",
        image_token_index=3,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            projection_dim=64,
        ),
    ),
    "qwen2-vl": dict(
        _qwen_vl("qwen2_vl", depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2),
        architectures=["Qwen2VLForConditionalGeneration"],
    ),
    # Qwen2.5-VL: windowed attention (2x2 LM tokens = 16 patches per window) in layer 0, the whole image in
    # layer 1; a SwiGLU MLP; RMSNorm.
    "qwen2.5-vl": dict(
        _qwen_vl(
            "qwen2_5_vl",
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=_TEXT["hidden_size"],
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    ),
}
# LLaVA-NeXT (anyres: a base image + crops on a pinpoint grid), LLaVA's shapes otherwise.
FAMILIES["llava-next"] = dict(
    FAMILIES["llava"],
    architectures=["LlavaNextForConditionalGeneration"],
    model_type="llava_next",
    image_grid_pinpoints=[[64, 64], [64, 128], [128, 64]],
)
# LLaVA-OneVision: LLaVA-NeXT's layout with up to 4x4 crops, so a large image's grid is shrunk (bilinear) to
# at most 9 crops' worth of tokens ("anyres_max_9").
FAMILIES["llava-onevision"] = dict(
    FAMILIES["llava"],
    architectures=["LlavaOnevisionForConditionalGeneration"],
    model_type="llava_onevision",
    video_token_index=7,
    vision_aspect_ratio="anyres_max_9",
    image_grid_pinpoints=[[64 * r, 64 * c] for r in range(1, 5) for c in range(1, 5)],
)
# Qwen3-VL (deepstack: tower features feed LM layers too): flopwise neither costs nor prunes it; the tiny one
# is for what a user of such a model meets.
UNSUPPORTED = {
    "qwen3-vl": dict(
        _qwen_vl(
            "qwen3_vl",
            interleaved=True,
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=_TEXT["hidden_size"],
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        architectures=["Qwen3VLForConditionalGeneration"],
    )
}


def _corpus_files() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "*.py")))[:60]


def train_tokenizer(out_dir: str):
    """A byte-level BPE of ``VOCAB`` tokens trained on Python stdlib sources, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train(_corpus_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def build(family: str, out_dir: str, seed: int = 0) -> str:
    """Write a random-weight model of ``family`` (a key of FAMILIES) plus tokenizer to ``out_dir``."""
    import torch
    import transformers

    cfg_dict = json.loads(json.dumps({**FAMILIES, **UNSUPPORTED}[family]))
    arch = cfg_dict["architectures"][0]
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():  # random init at std 0.02 gives near-uniform logits; widen for varied text
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    from flopwise.atomic import atomic_directory

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer = train_tokenizer(str(tmp))
        if family in ("llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
            save_processor(family, config, tokenizer, str(tmp))
        if family in ("llava", "llava-next", "llava-onevision"):
            legacy_llava_keys(str(tmp))
    return out_dir


def save_processor(family: str, config, tokenizer, out_dir: str) -> None:
    """The image processor + processor vLLM needs to serve a tiny VLM (LLaVA: CLIP preprocessing;
    Qwen2-VL: images resized to 56..224 px per side, so 4..64 LM tokens)."""
    import transformers

    if family == "llava-onevision":
        side = config.vision_config.image_size
        with_cls = (side // config.vision_config.patch_size) ** 2 + 1  # the processor drops it ("default")
        processor = transformers.LlavaOnevisionProcessor(
            image_processor=transformers.LlavaOnevisionImageProcessor(
                size={"height": side, "width": side}, image_grid_pinpoints=config.image_grid_pinpoints
            ),
            video_processor=transformers.LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
            tokenizer=tokenizer,
            num_image_tokens=with_cls,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_token="<image>",
            video_token="<|video_pad|>",
            chat_template=tokenizer.chat_template,
        )
    elif family == "llava-next":
        side = config.vision_config.image_size
        image_processor = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=config.image_grid_pinpoints,
        )
        processor = transformers.LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_token="<image>",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
    elif family == "llava":
        side = config.vision_config.image_size
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
        processor = transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_token="<image>",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
    else:
        image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
        cls, video = {
            "qwen2.5-vl": (transformers.Qwen2_5_VLProcessor, transformers.Qwen2VLVideoProcessor),
            "qwen3-vl": (transformers.Qwen3VLProcessor, transformers.Qwen3VLVideoProcessor),
        }.get(family, (transformers.Qwen2VLProcessor, transformers.Qwen2VLVideoProcessor))
        processor = cls(
            image_processor=image_processor,
            video_processor=video(),
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
        )
    processor.save_pretrained(out_dir)


def legacy_llava_keys(out_dir: str) -> None:
    """transformers 5 saves the CLIP tower without its ``vision_model.`` level; vLLM (like every LLaVA
    checkpoint on the hub) expects it, and transformers reads both."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(out_dir, "model.safetensors")
    state = load_file(path)
    prefix = "vision_tower."
    state = {
        (
            prefix + "vision_model." + k[len(prefix) :]
            if k.startswith(prefix) and ".vision_model." not in k
            else k
        ): v
        for k, v in state.items()
    }
    save_file(state, path, metadata={"format": "pt"})
