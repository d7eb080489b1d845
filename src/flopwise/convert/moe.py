"""Fewer experts (and optionally fewer active experts per token) for Mixtral / Qwen2-MoE / Qwen3-MoE.

A calibration pass over local text gathers, per MoE layer, each expert's routing frequency, its REAP
saliency, its router logits and its mean output. Then, keeping ``experts`` experts per layer:

* ``frequency``: keep the most often routed experts, drop the rest (with their router rows);
* ``reap`` (Lasby et al., 2025, arXiv:2510.13999): keep the experts of highest saliency, the mean over
  tokens routed to them of gate value x norm of their output;
* ``mc-smoe`` (Li et al., 2023, arXiv:2310.01334): the most frequent experts are dominant; every other
  expert joins the dominant one whose router logits it matches best (cosine over calibration tokens);
  each group's weights are averaged, weighted by routing frequency; the router keeps the dominant row;
* ``hc-smoe`` (Chen et al., 2024, arXiv:2410.08589): average-linkage hierarchical clustering of the experts'
  mean outputs (cosine distance) into ``experts`` clusters, frequency-weighted merge, router rows averaged;
* ``uniform``: the naive baseline: experts merged in index order into equal groups, plain averages.

Merging alone leaves active FLOPs unchanged (still top-k experts per token); ``top_k`` lowers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.convert.io import ConvertError, calibration_pass

ARCHITECTURES = {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"}
METHODS = ("mc-smoe", "reap", "hc-smoe", "frequency", "uniform")
_EXPERT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts"}


@dataclass(frozen=True)
class MoEMergeConfig:
    experts: int
    method: str = "mc-smoe"
    top_k: int | None = None  # None keeps the model's top-k

    def resolve(self, num_experts: int, top_k: int) -> int:
        """The new top-k, after checking the arguments against the model."""
        if self.method not in METHODS:
            raise ConvertError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.top_k if self.top_k is not None else top_k
        if not 1 <= self.experts <= num_experts or (self.experts == num_experts and k >= top_k):
            raise ConvertError(
                f"--experts {self.experts} must be at least 1 and fewer than the model's {num_experts} "
                "(or equal to it with a lower --top-k)"
            )
        if not 1 <= k <= top_k:
            raise ConvertError(f"--top-k {k} must be between 1 and the model's top-k {top_k}")
        if self.experts < k:
            raise ConvertError(
                f"--experts {self.experts} is fewer than top-k {k}"
                + ("" if self.top_k else " (lower it with --top-k)")
            )
        return k


def moe_blocks(model) -> list[tuple[int, torch.nn.Module]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _expert_out(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def _route(block, x: torch.Tensor, top_k: int, normalize: bool):
    logits = torch.nn.functional.linear(x, block.gate.weight)
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return logits, top_w, top_i


def calibrate(model, rows: torch.Tensor, max_tokens: int = 4096) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer: ``freq`` [E], ``reap`` [E], ``logits`` [N, E] and ``mean_out`` [E, D] on calibration
    rows."""
    cfg = model.config
    top_k = cfg.num_experts_per_tok
    normalize = cfg.model_type == "mixtral" or bool(getattr(cfg, "norm_topk_prob", False))
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, block in moe_blocks(model):
        hooks.append(
            block.register_forward_pre_hook(
                lambda _m, args, i=i: inputs.setdefault(i, []).append(
                    args[0].detach().reshape(-1, args[0].shape[-1])
                )
            )
        )
    calibration_pass(model, rows, hooks)
    stats = {}
    with torch.no_grad():
        for i, block in moe_blocks(model):
            x = torch.cat(inputs[i])[:max_tokens].float()
            E = block.gate.weight.shape[0]
            logits, top_w, top_i = _route(block, x, top_k, normalize)
            freq = torch.zeros(E)
            reap = torch.zeros(E)
            mean_out = torch.zeros(E, x.shape[-1])
            for e in range(E):
                out = _expert_out(block.experts, e, x)
                mean_out[e] = out.mean(0)
                routed = top_i == e
                tok = routed.any(-1)
                freq[e] = tok.float().mean()
                if tok.any():
                    gate = (top_w * routed).sum(-1)[tok]
                    reap[e] = (gate * out[tok].norm(dim=-1)).mean()
            stats[i] = {"freq": freq, "reap": reap, "logits": logits.float(), "mean_out": mean_out}
    return stats


def plan(
    stats: dict[str, torch.Tensor], k_experts: int, method: str
) -> list[tuple[list[int], list[float], list[float]]]:
    """Groups for one layer: (old experts, weight-merge coefficients, router-row coefficients) per new
    expert."""
    freq = stats["freq"]
    E = freq.shape[0]
    if k_experts == E:
        return [([e], [1.0], [1.0]) for e in range(E)]
    if method == "uniform":
        groups = [list(range(E))[g::k_experts] for g in range(k_experts)]
        return [(g, [1 / len(g)] * len(g), [1 / len(g)] * len(g)) for g in groups]
    if method in ("frequency", "reap"):
        score = freq if method == "frequency" else stats["reap"]
        keep = sorted(torch.argsort(score, descending=True)[:k_experts].tolist())
        return [([e], [1.0], [1.0]) for e in keep]
    if method == "mc-smoe":
        dominant = sorted(torch.argsort(freq, descending=True)[:k_experts].tolist())
        cols = torch.nn.functional.normalize(stats["logits"].T, dim=-1)  # [E, N]
        groups = {d: [d] for d in dominant}
        for e in range(E):
            if e not in groups:
                groups[max(dominant, key=lambda d: float(cols[e] @ cols[d]))].append(e)
        out = []
        for d in dominant:
            members = groups[d]
            w = freq[members] + 1e-6
            out.append((members, (w / w.sum()).tolist(), [1.0 if m == d else 0.0 for m in members]))
        return out
    # hc-smoe: average linkage on cosine distance between mean expert outputs
    v = torch.nn.functional.normalize(stats["mean_out"], dim=-1)
    dist = 1 - v @ v.T
    clusters = [[e] for e in range(E)]
    while len(clusters) > k_experts:
        best, pair = None, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                dd = float(dist[clusters[a]][:, clusters[b]].mean())
                if best is None or dd < best:
                    best, pair = dd, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    out = []
    for members in sorted(clusters):
        w = freq[members] + 1e-6
        coeffs = (w / w.sum()).tolist()
        out.append((members, coeffs, coeffs))
    return out


def convert(model, cfg: MoEMergeConfig, stats: dict[int, dict[str, torch.Tensor]]):
    """A new model with ``cfg.experts`` experts per MoE layer (and the new top-k); ``model`` is unchanged."""
    import copy

    c = model.config
    key = _EXPERT_KEY[c.model_type]
    k = cfg.resolve(getattr(c, key), c.num_experts_per_tok)
    new_config = copy.deepcopy(c)
    setattr(new_config, key, cfg.experts)
    new_config.num_experts_per_tok = k
    new = type(model)(new_config).to(next(model.parameters()).dtype)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    for i, block in moe_blocks(model):
        prefix = f"model.layers.{i}.mlp."
        groups = plan(stats[i], cfg.experts, cfg.method)
        router, gate_up, down = (
            block.gate.weight.detach(),
            block.experts.gate_up_proj.detach(),
            block.experts.down_proj.detach(),
        )

        def mix(tensor, members, coeffs):
            return sum(w * tensor[m] for m, w in zip(members, coeffs))

        state[prefix + "gate.weight"] = torch.stack([mix(router, m, r) for m, _, r in groups])
        state[prefix + "experts.gate_up_proj"] = torch.stack([mix(gate_up, m, w) for m, w, _ in groups])
        state[prefix + "experts.down_proj"] = torch.stack([mix(down, m, w) for m, w, _ in groups])
    new.load_state_dict(state, strict=True)
    return new.eval()
