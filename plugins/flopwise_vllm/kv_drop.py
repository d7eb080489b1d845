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
* Under a token budget, the same impl re-scores a decoding request's kept context when its job says so
  (after that step's attention, with the recent queries it keeps for it: :mod:`flopwise_vllm.kv_state`)
  and compacts the best in place into the first of those blocks.
* :class:`FlopwiseCPUAttentionMetadataBuilder` rewrites, for every later step, that request's
  block-table row to [kept blocks ``dest``, its blocks from ``resume`` on] and shortens its ``seq_len``
  to match, before the kernel's scheduler metadata is built: attention reads only kept positions, never a
  freed block. Positions (RoPE, slot mapping) stay the original ones.
* :class:`FlopwiseCPUWorker` gives the builder the runner's row order and takes each step's jobs.

The backend replaces ``CPU_ATTN`` (``register_backend`` from :func:`flopwise_vllm.register`); with no job
in flight it is stock vLLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
from flopwise_vllm.kv_state import STATE, Task
from flopwise_vllm.seeded import SeededSamplingMixin
from flopwise_vllm.self_values import SelfValueMixin

WORKER_CLS = "flopwise_vllm.kv_drop.FlopwiseCPUWorker"
STOCK_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"


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


class FlopwiseCPUWorker(SelfValueMixin, SeededSamplingMixin, CPUWorker):
    """vLLM's CPU worker, telling the attention backend each step's KV jobs and the runner's row order (and
    keeping seeded requests alive through chunked prefill: :mod:`flopwise_vllm.seeded`; computing the
    ``self:`` heads' values: :mod:`flopwise_vllm.self_values`)."""

    def init_device(self):
        super().init_device()
        STATE.runner = self.model_runner

    def execute_model(self, scheduler_output):
        STATE.begin_step(scheduler_output)
        try:
            return super().execute_model(scheduler_output)
        finally:
            STATE.end_step()


@dataclass
class FlopwiseCPUAttentionMetadata(CPUAttentionMetadata):
    kv_tasks: list[Task] | None = None
    kv_queries: list[tuple[str, int, int]] | None = None  # (request, q0, q1): rows whose queries are kept


class FlopwiseCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        stock = self.is_cross_attention or self.is_encoder_only_attention
        if stock or STATE.runner is None or not (STATE.views or STATE.jobs or STATE.windows):
            return super().build(common_prefix_len, cm, fast_build)
        req_ids = STATE.runner.input_batch.req_ids[: cm.num_reqs]
        starts = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.tolist()
        table, lens, tasks, queries = None, None, [], []
        for i, rid in enumerate(req_ids):
            q0, q1 = starts[i], starts[i + 1]
            context_start = seq_lens[i] - (q1 - q0)
            view, job = STATE.views.get(rid), STATE.jobs.get(rid)
            if rid in STATE.windows:
                queries.append((rid, q0, q1))
            if view is not None and context_start >= view.prompt:
                if table is None:  # the runner's table is persistent: never edit it in place
                    table, lens = cm.block_table_tensor.clone(), cm.seq_lens.clone()
                row, keep, resume = cm.block_table_tensor[i], len(view.dest), view.resume
                table[i, keep : row.shape[0] - (resume - keep)] = row[resume:]  # skip blocks [keep, resume)
                table[i, :keep] = torch.tensor(view.dest, dtype=table.dtype)
                lens[i] -= (resume - keep) * self.block_size
            elif job is not None and context_start < job.prompt and (job.stash or job.layout is not None):
                blocks = cm.block_table_tensor[i].clone() if job.layout is not None else None
                # The prompt's rows only: a request recomputed after preemption prefills its output too.
                tasks.append(Task(rid, q0, min(q1, q0 + job.prompt - context_start), job, blocks))
            if job is not None and job.rescore is not None:  # (decoding: with or without a view yet)
                tasks.append(Task(rid, q0, q1, job, None))
        if table is not None:
            cm = dataclasses.replace(cm, block_table_tensor=table, seq_lens=lens)
        md = super().build(common_prefix_len, cm, fast_build)
        if not (tasks or queries):
            return md
        return FlopwiseCPUAttentionMetadata(
            **{f.name: getattr(md, f.name) for f in dataclasses.fields(md)},
            kv_tasks=tasks,
            kv_queries=queries,
        )


def _layer_index(layer) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer.layer_name)


class FlopwiseCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if self.attn_type != AttentionType.DECODER or not isinstance(
            attn_metadata, FlopwiseCPUAttentionMetadata
        ):
            return out
        q = query.view(-1, self.num_heads, self.head_size)
        index = _layer_index(layer)
        for rid, q0, q1 in attn_metadata.kv_queries or ():
            STATE.keep_queries(rid, index, q[q0:q1])
        k = key.view(-1, self.num_kv_heads, self.head_size)
        v = value.view(-1, self.num_kv_heads, self.head_size)
        for task in attn_metadata.kv_tasks or ():
            if task.job.rescore is not None:
                self._rescore(layer, index, task, kv_cache)
            else:
                self._drop(layer, task, q, k, v, kv_cache)
        return out

    def _drop(self, layer, task: Task, query, key, value, kv_cache) -> None:
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
        self._write(layer, kv_cache, keys, values, idx, task.job.dest, bs)

    def _rescore(self, layer, index: int, task: Task, kv_cache) -> None:
        """Re-score a request's kept context (decode, token budget) and compact the best into its first
        blocks: the rows are read back from the cache, this step's KV included."""
        r = task.job.rescore
        comp, policy = r.compaction, kd.get_policy(task.job.policy)
        keys, values = read_cache(kv_cache, torch.tensor(r.sources), layer.isa)
        keys, values = keys[: comp.rows], values[: comp.rows]
        w = policy.decode_window
        ctx = kd.KVContext(
            keys=keys,
            queries=STATE.recent[(task.request_id, index)].last(w) if w else None,
            start=0,
            end=comp.candidates,
            layer=index,
        )
        idx = kd.keep_indices(policy, ctx, comp.new_kept * comp.block_size, sinks=kd.SINKS)
        self._write(layer, kv_cache, keys, values, idx, r.dest, comp.block_size)

    def _write(self, layer, kv_cache, keys, values, idx, dest: tuple[int, ...], bs: int) -> None:
        """Write each head's kept rows ``idx`` [Hkv, m] of ``keys``/``values`` compacted into ``dest``,
        through the kernel's own cache writer (so the ISA-specific block layout is respected)."""
        heads = torch.arange(idx.shape[0]).unsqueeze(0)
        kept_k, kept_v = keys[idx.T, heads], values[idx.T, heads]  # [m, Hkv, d]: head h's j-th kept token
        j = torch.arange(idx.shape[1])
        slots = torch.tensor(dest, dtype=torch.long)[j // bs] * bs + j % bs
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
