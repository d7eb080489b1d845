"""Query-head reduction of a pretrained model: Sparse Query Attention (Filipek, 2025, arXiv:2510.01817).

SQA keeps the keys and values and uses fewer query heads, so the attention score and value products
(and the query / output projections) shrink in proportion. The paper trains such models from scratch;
this converts a pretrained Llama / Mistral / Qwen2 / Qwen3 checkpoint:

* ``select``: in each KV group, keep the query heads that contribute most to the layer's output on
  calibration text (mean norm of the head's slice of ``o_proj`` applied to its attention output);
* ``merge``: in each KV group, keep that many heads as centres and fold every other head into the centre
  whose query projection is most similar: the centre's query becomes the importance-weighted mean of its
  members', and its ``o_proj`` columns their sum (each member's contribution, computed with the merged
  attention pattern).

``kv_heads`` below the model's merges whole KV groups (mean of their key / value projections) first,
which gives the symmetric (sSQA) and extreme (xSQA) variants. A short self-distillation (KL to the
original model's next-token distribution on local text) recovers quality. The output has an explicit
``head_dim``, which stock vLLM and transformers load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.convert.io import ConvertError, calibration_pass

ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
METHODS = ("select", "merge")


@dataclass(frozen=True)
class SQAConfig:
    query_heads: int
    kv_heads: int | None = None  # None keeps the model's KV heads
    method: str = "select"

    def resolve(self, q_heads: int, kv_heads: int) -> tuple[int, int]:
        """(H, K) after checking they form a valid grouping of the model's (q_heads, kv_heads)."""
        if self.method not in METHODS:
            raise ConvertError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        K = self.kv_heads or kv_heads
        H = self.query_heads
        if K < 1 or K > kv_heads or kv_heads % K:
            raise ConvertError(f"--kv-heads {K} must divide the model's {kv_heads} KV heads")
        if H < K or H % K:
            raise ConvertError(f"--query-heads {H} must be a positive multiple of the {K} KV heads")
        if H > q_heads:
            raise ConvertError(f"--query-heads {H} exceeds the model's {q_heads} query heads")
        if (H, K) == (q_heads, kv_heads):
            raise ConvertError(f"--query-heads {H} and --kv-heads {K} equal the model's: nothing to reduce")
        return H, K


def head_importance(model, rows: torch.Tensor) -> torch.Tensor:
    """[layers, q_heads]: mean L2 norm of each head's contribution to its layer's attention output."""
    cfg = model.config
    q, d = (
        cfg.num_attention_heads,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    )
    layers = model.model.layers
    scores = torch.zeros(len(layers), q)
    hooks = []

    def make_hook(i, o_proj):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, q, d)  # [tokens, heads, d]
            w = o_proj.weight.detach().float().reshape(-1, q, d)  # [hidden, heads, d]
            contrib = torch.einsum("thd,ohd->tho", x, w)  # each head's slice of the output
            scores[i] += contrib.norm(dim=-1).mean(0)

        return hook

    for i, layer in enumerate(layers):
        o_proj = layer.self_attn.o_proj
        hooks.append(o_proj.register_forward_pre_hook(make_hook(i, o_proj)))
    calibration_pass(model, rows, hooks)
    return scores


def _plan_group(members: list[int], keep: int, importance: torch.Tensor, q_rows: torch.Tensor, method: str):
    """Clusters of old head indices for one new KV group; each cluster becomes one new head."""
    order = sorted(members, key=lambda h: -float(importance[h]))
    centres = sorted(order[:keep])
    if method == "select":
        return [[c] for c in centres]
    clusters = {c: [c] for c in centres}
    flat = torch.nn.functional.normalize(q_rows.reshape(q_rows.shape[0], -1), dim=-1)
    for h in order[keep:]:
        best = max(centres, key=lambda c: float(flat[h] @ flat[c]))
        clusters[best].append(h)
    return [clusters[c] for c in centres]


def convert(model, cfg: SQAConfig, importance: torch.Tensor):
    """A new model with ``cfg``'s heads, its weights derived from ``model`` (which is left as it was)."""
    import copy

    c = model.config
    q, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    d = getattr(c, "head_dim", None) or c.hidden_size // q
    H, K = cfg.resolve(q, kv)
    new_config = copy.deepcopy(c)
    new_config.num_attention_heads, new_config.num_key_value_heads, new_config.head_dim = H, K, d
    new = type(model)(new_config).to(next(model.parameters()).dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    per_old_group, old_groups_per_new = q // kv, kv // K
    for i, layer in enumerate(model.model.layers):
        att = layer.self_attn
        prefix = f"model.layers.{i}.self_attn."
        Wq = att.q_proj.weight.detach().reshape(q, d, -1)
        Wo = att.o_proj.weight.detach().reshape(-1, q, d)
        Wk = att.k_proj.weight.detach().reshape(kv, d, -1)
        Wv = att.v_proj.weight.detach().reshape(kv, d, -1)
        bq = att.q_proj.bias.detach().reshape(q, d) if att.q_proj.bias is not None else None
        bk = att.k_proj.bias.detach().reshape(kv, d) if att.k_proj.bias is not None else None
        bv = att.v_proj.bias.detach().reshape(kv, d) if att.v_proj.bias is not None else None
        new_q, new_bq, new_o, new_k, new_v, new_bk, new_bv = [], [], [], [], [], [], []
        for g in range(K):
            old = list(range(g * old_groups_per_new, (g + 1) * old_groups_per_new))
            new_k.append(Wk[old].mean(0))
            new_v.append(Wv[old].mean(0))
            if bk is not None:
                new_bk.append(bk[old].mean(0))
                new_bv.append(bv[old].mean(0))
            members = [h for o in old for h in range(o * per_old_group, (o + 1) * per_old_group)]
            for cluster in _plan_group(members, H // K, importance[i], Wq, cfg.method):
                w = importance[i][cluster].clamp_min(1e-8)
                w = (w / w.sum()).to(Wq.dtype)
                new_q.append(torch.einsum("c,cdh->dh", w, Wq[cluster]))
                if bq is not None:
                    new_bq.append(torch.einsum("c,cd->d", w, bq[cluster]))
                new_o.append(Wo[:, cluster].sum(1))
        state[prefix + "q_proj.weight"] = torch.stack(new_q).reshape(H * d, -1)
        state[prefix + "o_proj.weight"] = torch.stack(new_o, dim=1).reshape(Wo.shape[0], H * d)
        state[prefix + "k_proj.weight"] = torch.stack(new_k).reshape(K * d, -1)
        state[prefix + "v_proj.weight"] = torch.stack(new_v).reshape(K * d, -1)
        if bq is not None:
            state[prefix + "q_proj.bias"] = torch.stack(new_bq).reshape(H * d)
        if bk is not None:
            state[prefix + "k_proj.bias"] = torch.stack(new_bk).reshape(K * d)
            state[prefix + "v_proj.bias"] = torch.stack(new_bv).reshape(K * d)
    new.load_state_dict(state, strict=True)
    return new.eval()


def distill(
    student,
    teacher,
    rows: torch.Tensor,
    steps: int,
    lr: float = 5e-5,
    batch: int = 4,
    progress=None,
    bf16: bool = False,
) -> list[float]:
    """``steps`` steps of KL(teacher || student) on next-token distributions; returns the losses.

    ``bf16``: run the forward passes under bf16 autocast (weights and optimizer stay float32), for CPUs
    with native bf16 where it is several times faster.
    """
    from contextlib import nullcontext

    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    student.train()
    losses = []
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % rows.shape[0]
        x = rows[idx]
        with torch.no_grad(), amp:
            target = torch.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
        with amp:
            logits = student(input_ids=x).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean") / x.shape[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step, loss.item())
    student.eval()
    return losses
