"""``flopwise batch IN -o OUT --ray [ADDRESS] --replicas N``: the same batch, spread over vLLM engines on Ray.

The lines go through a Ray Data LLM :class:`ray.data.llm.Processor` whose stage is :class:`FlopwiseEngineUDF`:
each replica, a Ray Data actor holding ``--cpus-per-replica`` CPUs, starts one vLLM engine with flopwise's
plugins (they load from the installed package's entry points, so every node needs flopwise installed) and
serves its lines through vLLM's OpenAI handlers extended by flopwise, exactly as the local ``flopwise batch``
does. Ray Data LLM's own vLLM stage is not used because it returns token outputs, not OpenAI bodies, and drops
the ``ec_transfer_params`` that carry flopwise's FLOP charge from the engine.

Fault tolerance is Ray Data's: a replica that dies (process killed, node lost) is restarted and its unfinished
batches run again. A batch's records reach the driver in one piece when the batch completes, and the driver
writes each line once (the first record for it), so the output file has every custom_id exactly once and an
interrupted run resumes as a local one does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from flopwise_serve.batch_engine import engine_args, open_handlers, serve_line
from flopwise_serve.batch_records import Line, Summary, count, start

# Environment the engines need on every node; the rest of the driver's environment stays on the driver.
ENV_PREFIXES = ("VLLM_", "FLOPWISE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
# Lines are handed out once every replica is up (evenly, not all to the first one ready); a replica that
# cannot be placed or started in this time fails the run with Ray's reason.
REPLICA_START_TIMEOUT_S = 900
AUTH_HINT = (
    "; if the cluster uses token authentication (`ray start --head` turns it on when ~/.ray/auth_token "
    "exists), set RAY_AUTH_MODE=token here with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
)


class RayBatchError(RuntimeError):
    """A run that cannot go on: an unreachable cluster, too few CPUs, a replica that cannot start."""


try:  # the extra `flopwise[ray]`; the stage class is only defined where Ray is installed
    from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF
except ImportError:  # pragma: no cover - without Ray, run_on_ray says how to install it
    StatefulStage = StatefulStageUDF = None

if StatefulStageUDF is not None:

    class FlopwiseEngineUDF(StatefulStageUDF):
        """One replica: a vLLM engine with flopwise's plugins, serving batch lines through the OpenAI
        handlers.

        Input rows: ``line`` (number), ``custom_id``, ``url``, ``body`` (JSON text: Arrow keeps no mixed-shape
        dicts). Output: ``record`` (the output line, JSON text), ``replica`` (host:pid) and ``ready`` (when
        its engine was up, epoch seconds).
        """

        def __init__(self, data_column: str, expected_input_keys: list[str], engine_argv: list[str]):
            super().__init__(data_column, expected_input_keys)
            import ray
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.usage.usage_lib import UsageContext
            from vllm.v1.engine.async_llm import AsyncLLM

            # Ray reserves CPUs but pins no cores: let the engine run as many threads as CPUs it holds,
            # unbound, instead of every replica binding its threads to all of the node's cores.
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus)))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            self.args = engine_args(engine_argv)
            config = AsyncEngineArgs.from_cli_args(self.args).create_engine_config(
                usage_context=UsageContext.OPENAI_API_SERVER
            )
            self.engine = AsyncLLM.from_vllm_config(
                vllm_config=config, usage_context=UsageContext.OPENAI_API_SERVER, disable_log_stats=True
            )
            self.replica = f"{socket.gethostname()}:{os.getpid()}"
            self.ready = time.time()
            self._handlers: tuple[dict, str] | None = None
            self._opening: asyncio.Lock | None = None

        async def _open(self) -> tuple[dict, str]:
            # The handlers are built on the event loop Ray Data runs this UDF's calls on.
            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                if self._handlers is None:
                    self._handlers = await open_handlers(self.engine, self.args)
            return self._handlers

        async def udf(self, rows: list[dict]):
            handlers, model_name = await self._open()

            async def one(row: dict) -> dict:
                line = Line(int(row["line"]), row["custom_id"], row["url"], json.loads(row["body"]))
                record = await serve_line(line, handlers, model_name)
                return {
                    self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],
                    "record": json.dumps(record),
                    "replica": self.replica,
                    "ready": self.ready,
                }

            for done in asyncio.as_completed([asyncio.create_task(one(row)) for row in rows]):
                yield await done

        def __del__(self):
            if hasattr(self, "engine"):
                self.engine.shutdown()  # the engine's own process would outlive the actor otherwise

    class FlopwiseEngineStage(StatefulStage):
        fn: type[StatefulStageUDF] = FlopwiseEngineUDF

        def get_required_input_keys(self) -> dict[str, str]:
            return {
                "line": "input line number",
                "custom_id": "the line's custom_id",
                "url": "endpoint path",
                "body": "request body, JSON text",
            }


def connect(address: str | None):
    """Join the cluster at ``address`` ('auto', 'host:port', 'ray://host:port'), or start a local Ray
    instance."""
    try:
        import ray
    except ImportError:
        raise RayBatchError("Ray is not installed: pip install 'flopwise[ray]'") from None
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except ValueError:
            raise RayBatchError(f"--ray {address!r}: expected HOST:PORT of the cluster's head node") from None
        except OSError as e:
            raise RayBatchError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None
    # its plan and progress lines; the bar counts lines
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        ray.init(
            address=address or None,
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = AUTH_HINT if address and os.environ.get("RAY_AUTH_MODE") != "token" else ""
        raise RayBatchError(
            f"cannot join the Ray cluster at {address or 'a new local instance'}: {e}{hint}"
        ) from None
    return ray


def build_processor(
    ray,
    engine_argv: list[str],
    env: dict[str, str],
    replicas: int,
    cpus: float,
    batch_size: int,
    concurrent_batches: int,
):
    """A Ray Data LLM Processor: ``replicas`` actors, each one engine holding ``cpus`` CPUs."""
    from ray.data.llm import Processor, ProcessorConfig

    stage = FlopwiseEngineStage(
        fn_constructor_kwargs={"engine_argv": engine_argv},
        map_batches_kwargs=dict(
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(
                size=replicas, max_tasks_in_flight_per_actor=concurrent_batches
            ),
            # batches in flight per replica, so its engine batches across them
            max_concurrency=concurrent_batches,
            num_cpus=cpus,
            runtime_env={"env_vars": {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)}},
        ),
    )
    light = {"num_cpus": 0}  # row reshaping only: never wait for a CPU the engines hold
    return Processor(
        ProcessorConfig(batch_size=batch_size, concurrency=replicas),
        [stage],
        postprocess=lambda row: {k: row[k] for k in ("record", "replica", "ready")},
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )


def run_on_ray(lines: list[Line], output: Path, engine_argv: list[str], env: dict[str, str], args) -> Summary:
    """Run the batch over ``args.replicas`` engines of the Ray cluster ``args.ray`` ('' = a new local
    instance)."""
    from tqdm import tqdm

    if StatefulStageUDF is None:
        raise RayBatchError("Ray is not installed: pip install 'flopwise[ray]'")
    summary, writer, runnable = start(lines, output)
    try:
        if not runnable:
            return summary
        ray = connect(args.ray or None)
        have = ray.cluster_resources().get("CPU", 0)
        need = args.replicas * args.cpus_per_replica
        if need > have:
            raise RayBatchError(
                f"the Ray cluster has {have:g} CPUs; --replicas {args.replicas} x --cpus-per-replica "
                f"{args.cpus_per_replica:g} needs {need:g}"
            )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar below, counting lines
        ctx.wait_for_min_actors_s = REPLICA_START_TIMEOUT_S
        rows = [
            {"line": ln.number, "custom_id": ln.custom_id, "url": ln.url, "body": json.dumps(ln.body)}
            for ln in runnable
        ]
        blocks = max(1, min(len(rows), -(-len(rows) // args.batch_size)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        processor = build_processor(
            ray,
            engine_argv,
            env,
            args.replicas,
            args.cpus_per_replica,
            args.batch_size,
            args.concurrent_batches,
        )
        written: set[str] = set()
        first = 0.0
        bar = tqdm(
            total=len(runnable),
            desc=f"flopwise batch (ray, {args.replicas} replicas)",
            unit="req",
            file=sys.stderr,
        )
        try:
            for row in processor(ds).iter_rows():
                record = json.loads(row["record"])
                if (
                    record["custom_id"] in written
                ):  # a retried batch can deliver a line twice: the first stands
                    continue
                written.add(record["custom_id"])
                writer.write(record)
                count(summary, record, row["replica"], served=True)
                first = first or summary.last_record
                if (
                    row["ready"] <= first
                ):  # lines flow once the first replicas are all up (not a restarted one)
                    summary.up = max(summary.up, row["ready"])
                bar.update(1)
        except Exception as e:  # Ray wraps the cause (a replica's start-up error, a lost cluster)
            raise RayBatchError(f"the Ray run stopped: {_cause(e)}") from e
        finally:
            bar.close()
    finally:
        writer.close()
    return summary


def _cause(e: BaseException) -> str:
    """The innermost error's type and first line: Ray's wrappers repeat the whole remote traceback."""
    while True:
        inner = getattr(e, "cause", None) or e.__cause__
        if inner is None or inner is e:
            break
        e = inner
    text = str(e).strip().splitlines()
    last = [t for t in text if t.strip()][-1] if text else ""
    return f"{type(e).__name__}: {last}"[:500]
