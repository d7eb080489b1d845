"""KV token dropping inside vLLM's paged cache (CPU attention backend + CPU worker).

The scheduler (:class:`flopwise_vllm.scheduler.FlopwiseScheduler`, :mod:`flopwise_vllm.kv_planner`)
decides, per request, *where*: when a request's last prefill chunk is scheduled it fixes the
:class:`flopwise.techniques.kv_drop.Layout` (the compressible region, how many blocks stay) and the blocks
the kept tokens go to, and sends a :class:`KVJob` to the worker on the scheduler output
(``SchedulerOutput.flopwise_kv``). After that step it returns the region's other blocks to the pool.

The worker side, here, decides *what*, layer by layer, in the forward pass that completes the prompt:

* :class:`FlopwiseCPUAttentionImpl` runs stock attention (the prompt sees its whole context), then scores
  the prompt's tokens with the policy and writes each KV head's kept keys/values compacted into the
  job's destination blocks, through the kernel's own cache writer (so the ISA-specific block layout is
  respected). Earlier prefill chunks of such a request are stashed so the last one sees the whole
  prompt; prefix-cache hits it did not compute are read back from their shared blocks
  (:func:`read_cache`), which it never writes.
* :class:`FlopwiseCPUAttentionMetadataBuilder` rewrites, for every later step, that request's
  block-table row to [kept blocks, tail blocks] (minus the tail blocks evicted under a token
  budget) and shortens its ``seq_len`` to match, before the kernel's scheduler metadata is built:
  attention reads only kept positions, never a freed block. Positions (RoPE, slot mapping) stay the
  original ones.
* :class:`FlopwiseCPUWorker` gives the builder the runner's row order and takes each step's jobs.

The backend replaces ``CPU_ATTN`` (``register_backend`` from :func:`flopwise_vllm.register`); with no job
in flight it is stock vLLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.worker.cpu_worker import CPUWorker

from flopwise.techniques import kv_drop as kd
from flopwise_vllm.kv_cache_io import caches, read_cache
from flopwise_vllm.seeded import SeededSamplingMixin
from flopwise_vllm.self_values import SelfValueMixin

WORKER_CLS = "flopwise_vllm.kv_drop.FlopwiseCPUWorker"
STOCK_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
OUTPUT_ATTR = "flopwise_kv"  # SchedulerOutput attribute carrying {request id: KVJob}


def runs_worker(vllm_config) -> bool:
    """Whether the engine runs flopwise's CPU worker (KV dropping and ``self:`` heads need it)."""
    return vllm_config.parallel_config.worker_cls == WORKER_CLS


def kv_supported(vllm_config, flop_model) -> bool:
    """KV dropping frees blocks that only flopwise's KV worker + attention backend compact: it needs them
    running, full attention (a sliding window already limits reads) and an unquantized KV cache."""
    return (
        runs_worker(vllm_config)
        and not flop_model.spec.windowed
        and vllm_config.cache_config.cache_dtype in ("auto", None)
    )


@dataclass(frozen=True)
class KVJob:
    """One request's drop, sent with each of its prefill steps. ``layout`` is set on the last one."""

    policy: str
    first: int  # the first position this request computes (after its prefix-cache hits)
    prompt: int
    layout: kd.Layout | None = None
    evicted: int = 0  # tail blocks evicted so far while decoding (token budget): also sent on its own
    dest: tuple[int, ...] = ()  # the blocks the region's kept tokens are written to, in order

    @property
    def reads(self) -> bool:
        """Does the request attend to less than its whole context from here on?"""
        return self.layout is not None and (self.layout.active or self.evicted > 0)


@dataclass
class _Task:
    request_id: str
    q0: int  # the row's tokens in this step's batch
    q1: int
    job: KVJob
    blocks: torch.Tensor | None  # the row's block ids (the last chunk only)


@dataclass
class WorkerState:
    """Per worker process: the runner (for row order), this step's jobs, the compacted requests."""

    runner: object | None = None
    jobs: dict[str, KVJob] = field(default_factory=dict)
    views: dict[str, KVJob] = field(default_factory=dict)  # requests reading fewer blocks than they hold
    stash: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = field(
        default_factory=dict
    )

    def begin_step(self, scheduler_output) -> None:
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        for rid in gone:
            self.views.pop(rid, None)
        if gone and self.stash:
            self.stash = {k: v for k, v in self.stash.items() if k[0] not in gone}
        self.jobs = getattr(scheduler_output, OUTPUT_ATTR, None) or {}
        for rid, job in self.jobs.items():
            self.views.pop(rid, None)  # a (re-)prefill lays out anew; an eviction replaces the view
            if job.reads:
                # Read by the builder only for rows past the prompt, i.e. from the next step on.
                self.views[rid] = job


STATE = WorkerState()


class FlopwiseCPUWorker(SelfValueMixin, SeededSamplingMixin, CPUWorker):
    """vLLM's CPU worker, telling the attention backend each step's KV jobs and the runner's row order (and
    keeping seeded requests alive through chunked prefill: :mod:`flopwise_vllm.seeded`; computing the
    ``self:`` heads' values: :mod:`flopwise_vllm.self_values`)."""

    def init_device(self):
        super().init_device()
        STATE.runner = self.model_runner

    def execute_model(self, scheduler_output):
        STATE.begin_step(scheduler_output)
        return super().execute_model(scheduler_output)


@dataclass
class FlopwiseCPUAttentionMetadata(CPUAttentionMetadata):
    kv_tasks: list[_Task] | None = None


class FlopwiseCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        stock = self.is_cross_attention or self.is_encoder_only_attention
        if stock or STATE.runner is None or not (STATE.views or STATE.jobs):
            return super().build(common_prefix_len, cm, fast_build)
        req_ids = STATE.runner.input_batch.req_ids[: cm.num_reqs]
        starts = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.tolist()
        table, lens, tasks = None, None, []
        for i, rid in enumerate(req_ids):
            q0, q1 = starts[i], starts[i + 1]
            context_start = seq_lens[i] - (q1 - q0)
            view, job = STATE.views.get(rid), STATE.jobs.get(rid)
            if view is not None and context_start >= view.prompt:
                if table is None:  # the runner's table is persistent: never edit it in place
                    table, lens = cm.block_table_tensor.clone(), cm.seq_lens.clone()
                row, lay = cm.block_table_tensor[i], view.layout
                keep, resume = lay.protected + lay.kept, lay.full + view.evicted  # skip blocks [keep, resume)
                table[i, keep : row.shape[0] - (resume - keep)] = row[resume:]
                table[i, lay.protected : keep] = torch.tensor(view.dest, dtype=table.dtype)
                lens[i] -= (resume - keep) * lay.block_size
            elif job is not None and context_start < job.prompt:
                blocks = cm.block_table_tensor[i].clone() if job.layout is not None else None
                # The prompt's rows only: a request recomputed after preemption prefills its output too.
                tasks.append(_Task(rid, q0, min(q1, q0 + job.prompt - context_start), job, blocks))
        if table is not None:
            cm = dataclasses.replace(cm, block_table_tensor=table, seq_lens=lens)
        md = super().build(common_prefix_len, cm, fast_build)
        if not tasks:
            return md
        return FlopwiseCPUAttentionMetadata(
            **{f.name: getattr(md, f.name) for f in dataclasses.fields(md)}, kv_tasks=tasks
        )


def _layer_index(layer) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer.layer_name)


class FlopwiseCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        tasks = getattr(attn_metadata, "kv_tasks", None)
        if tasks and self.attn_type == AttentionType.DECODER:
            q = query.view(-1, self.num_heads, self.head_size)
            k = key.view(-1, self.num_kv_heads, self.head_size)
            v = value.view(-1, self.num_kv_heads, self.head_size)
            for task in tasks:
                self._drop(layer, task, q, k, v, kv_cache)
        return out

    def _drop(self, layer, task: _Task, query, key, value, kv_cache) -> None:
        """Stash one prefill chunk of a request, or (its last chunk) score its whole prompt and write each
        head's kept KV compacted into the job's destination blocks."""
        index = _layer_index(layer)
        lay = task.job.layout
        if lay is not None and not lay.active:  # nothing to drop after all
            STATE.stash.pop((task.request_id, index), None)
            return
        policy = kd.get_policy(task.job.policy)
        k, v = key[task.q0 : task.q1], value[task.q0 : task.q1]
        q = policy.queries_of(query[task.q0 : task.q1])
        parts = STATE.stash.pop((task.request_id, index), [])
        if lay is None:  # not the last chunk: keep copies of what the last one needs (q: at most the window
            # of this chunk, whose union over chunks holds the prompt's last W queries)
            STATE.stash[(task.request_id, index)] = parts + [
                (k.clone(), v.clone(), None if q is None else q.clone())
            ]
            return
        if lay.kept == 0:  # the whole region goes: nothing to score or write
            return
        bs, first = lay.block_size, task.job.first
        if first:  # prefix-cache hits: their KV is read from the shared blocks, which stay as they are
            parts.insert(0, (*read_cache(kv_cache, task.blocks[: first // bs], layer.isa), None))
        parts.append((k, v, q))
        keys = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
        queries = [p[2] for p in parts if p[2] is not None]
        start, end = lay.region
        ctx = kd.KVContext(
            keys=keys,
            queries=policy.queries_of(torch.cat(queries)) if queries else None,
            start=start,
            end=end,
            layer=index,
        )
        idx = kd.keep_indices(policy, ctx, lay.kept_region_tokens)  # [Hkv, m] rows of keys
        heads = torch.arange(idx.shape[0]).unsqueeze(0)
        kept_k, kept_v = keys[idx.T, heads], values[idx.T, heads]  # [m, Hkv, d]: head h's j-th kept token
        j = torch.arange(lay.kept_region_tokens)
        slots = torch.tensor(task.job.dest, dtype=torch.long)[j // bs] * bs + j % bs
        key_cache, value_cache = caches(kv_cache)
        ops.cpu_attn_reshape_and_cache(
            kept_k.contiguous(),
            kept_v.contiguous(),
            key_cache,
            value_cache,
            slots,
            layer.isa,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )


class FlopwiseCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return FlopwiseCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return FlopwiseCPUAttentionMetadataBuilder
