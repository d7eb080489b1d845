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
which gives the symmetric (sSQA) and extreme (xSQA) variants. Then :func:`refit_output` solves each
layer's ``o_proj`` by least squares against the original's attention output (closed form, no training),
and :func:`distill` recovers the rest (logit KD, optional attention-output alignment, warm-up + cosine,
resumable: the caller checkpoints in ``on_every``). The output has an explicit ``head_dim``, which stock
vLLM and transformers load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _attention_pairs(teacher, student, rows: torch.Tensor, batch: int, visit) -> None:
    """Run ``rows`` through ``teacher``; at every layer call ``visit(i, x, y)`` with the student's per-head
    attention output ``x`` [tokens, H·d] (its attention run on the teacher's own input to that layer) and the
    teacher's attention output ``y`` [tokens, hidden]."""
    s_layers = student.model.layers
    captured: dict[int, torch.Tensor] = {}
    hooks = []

    def grab(i):
        def pre(_module, args):
            captured[i] = args[0].detach()

        return pre

    def make(i):
        def hook(_module, args, kwargs, output):
            kwargs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
            s_layers[i].self_attn(*args, **kwargs)
            x = captured.pop(i)
            y = output[0].detach()
            visit(i, x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double())

        return hook

    for i, layer in enumerate(teacher.model.layers):
        hooks.append(s_layers[i].self_attn.o_proj.register_forward_pre_hook(grab(i)))
        hooks.append(layer.self_attn.register_forward_hook(make(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for b in range(0, rows.shape[0], batch):
                teacher(input_ids=rows[b : b + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def refit_output(student, teacher, rows: torch.Tensor, batch: int = 4, ridge: float = 1e-3) -> list[float]:
    """Refit each layer's ``o_proj`` by least squares so that the reduced heads, run on the original model's
    inputs to that layer, best reproduce its attention output over the calibration tokens (ridge-regularised
    normal equations, [H·d, H·d] per layer). Returns each layer's relative error after the refit.

    A merged head's summed ``o_proj`` columns are right only where its members attended alike, a selected
    head's only where the dropped heads contributed nothing; the least-squares readout is the best linear one
    for the patterns the kept heads actually produce. SmolLM2-135M, 6 of 9 heads, 64 calibration blocks
    (bench/results/convert.md): select 69.5 → 19.3 perplexity (original 14.7), merge 42.7 → 27.6. In side
    runs (heads chosen on 16 blocks), fitting layer after layer on the student's own inputs instead did worse
    (to the teacher's attention output: 25.1 where this gave 19.3; to the teacher's residual stream,
    correcting earlier layers' drift: 74.3), and so did choosing the kept heads by this error (the subset per
    group whose readout leaves the least: error 0.057 → 0.054, perplexity 19.3 → 21.4).
    """
    n = len(student.model.layers)
    xtx: list = [None] * n
    xty: list = [None] * n
    yy = [0.0] * n

    def accumulate(i, x, y):
        xtx[i] = x.T @ x if xtx[i] is None else xtx[i] + x.T @ x
        xty[i] = x.T @ y if xty[i] is None else xty[i] + x.T @ y
        yy[i] += float((y * y).sum())

    _attention_pairs(teacher, student, rows, batch, accumulate)
    errors = []
    for i, layer in enumerate(student.model.layers):
        a, b = xtx[i], xty[i]
        lam = ridge * float(a.diagonal().mean())
        w = torch.linalg.solve(a + lam * torch.eye(a.shape[0], dtype=a.dtype), b)  # [H*d, hidden]
        o = layer.self_attn.o_proj
        with torch.no_grad():
            o.weight.copy_(w.T.to(o.weight.dtype))
        # ||XW - Y||^2 = W'X'XW - 2 W'X'Y + Y'Y, from the sums already held
        resid = float((w * (a @ w)).sum() - 2 * (w * b).sum()) + yy[i]
        errors.append(max(resid, 0.0) / max(yy[i], 1e-30))
    return errors


@dataclass(frozen=True)
class DistillConfig:
    """Self-distillation of a converted model toward its source: KL(teacher || student) on next-token
    distributions, plus (``align`` > 0) the relative squared error between each layer's attention output in
    the student and in the teacher, each in its own forward pass. Learning rate: linear warm-up over
    ``warmup`` steps, then cosine down to ``min_lr_ratio`` × ``lr`` at ``steps``."""

    steps: int
    lr: float = 2e-4
    warmup: int = 20
    min_lr_ratio: float = 0.1
    batch: int = 4
    align: float = 0.0

    def lr_at(self, step: int) -> float:
        import math

        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class DistillState:
    """Where a distillation stands: what a checkpoint holds besides the weights and optimizer."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # {"step", "perplexity", "loss"} at each evaluation
    resumed_at: list[int] = field(default_factory=list)  # the steps a run continued from a checkpoint


def _attention_outputs(model, store: list) -> list:
    def hook(_module, _args, output):
        store.append(output[0])

    return [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]


def distill(
    student,
    teacher,
    rows: torch.Tensor,
    cfg: DistillConfig,
    state: DistillState | None = None,
    optimizer_state: dict | None = None,
    every: int = 0,
    on_every=None,
    progress=None,
    bf16: bool = False,
) -> DistillState:
    """Run ``cfg.steps`` steps (from ``state.step`` when resuming); every ``every`` steps and at the end
    call ``on_every(state, optimizer)`` (evaluation, checkpoint). Step k reads rows k·batch … (k+1)·batch − 1
    (cycling), so a resumed run sees the same batches as an uninterrupted one.

    ``bf16``: forward passes under bf16 autocast (weights and optimizer stay float32), for CPUs with
    native bf16 where it is several times faster.
    """
    from contextlib import nullcontext

    state = state or DistillState()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    t_out: list = []
    s_out: list = []
    hooks = _attention_outputs(student, s_out) + _attention_outputs(teacher, t_out) if cfg.align else []
    try:
        student.train()
        while state.step < cfg.steps:
            step = state.step
            idx = torch.arange(step * cfg.batch, (step + 1) * cfg.batch) % rows.shape[0]
            x = rows[idx]
            t_out.clear()
            s_out.clear()
            with torch.no_grad(), amp:
                target = torch.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), dim=-1)
            with amp:
                logits = student(input_ids=x, use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            loss = (
                torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean") / x.shape[1]
            )
            if cfg.align:
                rel = [
                    ((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean()
                    for s, t in zip(s_out, t_out)
                ]
                loss = loss + cfg.align * torch.stack(rel).mean()
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.losses.append(loss.item())
            state.step += 1
            if progress is not None:
                progress(state.step, loss.item())
            if on_every is not None and (state.step == cfg.steps or (every and state.step % every == 0)):
                student.eval()
                on_every(state, opt)
                student.train()
    finally:
        for h in hooks:
            h.remove()
        student.eval()
    return state
