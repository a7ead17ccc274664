"""One engine process of ``lmtier bench --engine``: ``python -m lmtier.cli.bench.engine_run SPEC``.

SPEC is a JSON file: the model folder, the prompts (token ids), the engine's geometry and,
for the modes with offloading, its ``--kv-transfer-config`` as a mapping.  The requests run one
after another through vLLM's ``LLMEngine`` with its core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that what lmtier does happens beside the engine's own
thread, and this process can read lmtier's tier afterwards.  Prints one line, ``RESULT`` and a
JSON object: per request its cached tokens, output tokens and time to first token; the wall
time of all requests; the stall probe's lateness; and, with lmtier, the tier's counters, the
time the engine's thread spent inside the tier's methods (in all, and per engine step) and the
load jobs' own times.

The stall probe (``lmtier.cli.bench.stall``) runs in this process while the requests run.

With ``turns`` in SPEC (two pipe descriptors), the process takes turns with another: before a
request it waits for a byte on ``turns["wait"]`` (not before its first when ``turns["first"]``),
and after it, once the engine has no work left (its offloading jobs included, so the request's
blocks are in lmtier), it writes one to ``turns["signal"]``.  Two engines replaying alternate
requests thus see, each time, everything the other stored for the request before.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lmtier.cli.bench.stall import StallProbe, quantiles_ms

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

__all__ = ["main"]

RESULT_PREFIX = "RESULT "
#: The tier methods vLLM's scheduler calls on its own thread.
ENGINE_THREAD_METHODS = (
    "lookup",
    "submit_store",
    "submit_load",
    "get_finished_jobs",
    "has_pending_work",
    "touch",
    "on_new_request",
    "on_request_finished",
    "on_schedule_end",
)


class TierTimer:
    """Times lmtier's engine-thread methods (the secondary tier's and the CPU tier copy
    worker's) and collects the load and copy jobs' own times."""

    def __init__(self) -> None:
        self.tiers: list[Any] = []
        self.call_seconds = 0.0
        self.step_seconds: list[float] = []  # the time inside lmtier's methods, per step
        self.load_jobs: set[int] = set()
        self.load_job_seconds = 0.0
        self.copy_seconds: list[float] = []  # each KV <-> CPU tier copy job's own time
        # Calls over 1 ms, by name: how many, the longest (ms) and the CPU time it took (ms).
        self.long_calls: dict[str, tuple[int, float, float]] = {}

    def install_copies(self, cls: type) -> None:
        """Time the engine-thread methods of ``cls``, the worker that moves blocks between
        vLLM's KV and its CPU tier (it copies on that thread too), and collect its jobs' times."""
        for name in ("submit_store", "submit_load"):
            setattr(cls, name, self._timed(getattr(cls, name), "copy submit"))
        cls.get_finished = self._timed(cls.get_finished, "copies finished")  # type: ignore[attr-defined]

    def install(self, cls: type) -> None:
        init = cls.__init__  # type: ignore[misc]

        def remember(tier: Any, *args: Any, **kwargs: Any) -> None:
            init(tier, *args, **kwargs)
            self.tiers.append(tier)

        cls.__init__ = remember  # type: ignore[misc]
        for name in ENGINE_THREAD_METHODS:
            setattr(cls, name, self._timed(getattr(cls, name), name))

    def _timed(self, method: Callable[..., Any], name: str) -> Callable[..., Any]:
        clock = time.perf_counter

        @functools.wraps(method)
        def timed(tier: Any, *args: Any, **kwargs: Any) -> Any:
            started, cpu = clock(), time.thread_time()
            try:
                result = method(tier, *args, **kwargs)
                if name == "get_finished_jobs":
                    result = list(result)
                    for job in result:
                        if job.job_id in self.load_jobs:
                            self.load_jobs.discard(job.job_id)
                            self.load_job_seconds += getattr(job, "transfer_time", 0.0) or 0.0
                elif name == "submit_load":
                    self.load_jobs.add(int(args[0].job_id))
                elif name == "copies finished":
                    times = (getattr(job, "transfer_time", 0.0) or 0.0 for job in result)
                    self.copy_seconds.extend(map(float, times))
                return result
            finally:
                took = clock() - started
                self.call_seconds += took
                if took > 0.001:  # which of lmtier's calls make the long steps, and their CPU
                    count, longest, its_cpu = self.long_calls.get(name, (0, 0.0, 0.0))
                    if took * 1000 > longest:
                        longest, its_cpu = took * 1000, (time.thread_time() - cpu) * 1000
                    self.long_calls[name] = (count + 1, longest, its_cpu)

        return timed


class Turns:
    """Taking turns with another engine process through two pipes (see the module's text)."""

    def __init__(self, wait: int, signal: int, first: bool) -> None:
        self.wait_fd, self.signal_fd, self.skip = wait, signal, first

    def wait(self) -> None:
        if self.skip:
            self.skip = False
            return
        if not os.read(self.wait_fd, 1):
            raise RuntimeError("the other engine process ended before its turn was over")

    def signal(self) -> None:
        # Broken: the other engine has run all of its requests.
        with contextlib.suppress(BrokenPipeError):
            os.write(self.signal_fd, b"t")


def run_requests(
    llm: Any,
    prompts: list[list[int]],
    output_tokens: int,
    timer: TierTimer | None = None,
    turns: Turns | None = None,
) -> list[dict[str, Any]]:
    """Each prompt in turn: its cached tokens, greedy output tokens and time to first token;
    ``timer`` gets the time inside the tier per engine step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=output_tokens,
        temperature=0.0,
        detokenize=False,
        output_kind=RequestOutputKind.CUMULATIVE,
    )
    engine = llm.llm_engine
    steps = timer.step_seconds if timer is not None else []

    def step() -> list[Any]:
        before = timer.call_seconds if timer is not None else 0.0
        outputs: list[Any] = engine.step()
        if timer is not None:
            steps.append(timer.call_seconds - before)
        return outputs

    runs = []
    for number, prompt in enumerate(prompts):
        if turns is not None:
            turns.wait()
        started = time.perf_counter()
        first: float | None = None
        engine.add_request(str(number), TokensPrompt(prompt_token_ids=prompt), params)
        done = None
        while done is None:
            for out in step():
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter() - started
                if out.finished:
                    done = out
        if turns is not None:
            # The request's store jobs keep the scheduler busy until their blocks are placed.
            while engine.engine_core.engine_core.scheduler.has_requests():
                step()
            turns.signal()
        runs.append({
            "cached": done.num_cached_tokens or 0,
            "prompt": len(prompt),
            "tokens": list(done.outputs[0].token_ids),
            "ttft": first if first is not None else time.perf_counter() - started,
        })  # fmt: skip
    return runs


def main(path: str) -> None:
    import lmtier.integrations.vllm as integration
    from lmtier.integrations.vllm_cpu import TorchCopyWorker
    from lmtier.integrations.vllm_server import LmtierServerTier

    timer = TierTimer()
    timer.install(integration.LmtierSecondaryTier)
    timer.install(LmtierServerTier)  # what LmtierSecondaryTier with "server" builds
    timer.install_copies(TorchCopyWorker)

    from vllm import LLM
    from vllm.config import KVTransferConfig

    with open(path) as file:
        spec = json.load(file)
    kwargs: dict[str, Any] = {}
    if spec.get("kv_transfer_config"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer_config"])
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        dtype="float32",
        block_size=spec["block_size"],
        max_model_len=spec["max_model_len"],
        num_gpu_blocks_override=spec["gpu_blocks"],
        enable_prefix_caching=True,
        enforce_eager=True,
        seed=0,
        **kwargs,
    )
    probe = StallProbe()
    started = time.perf_counter()
    turns = None
    if spec.get("turns"):
        turns = Turns(spec["turns"]["wait"], spec["turns"]["signal"], spec["turns"]["first"])
    with probe:
        runs = run_requests(llm, spec["prompts"], spec["output_tokens"], timer, turns)
    wall = time.perf_counter() - started
    copies = {"s": sum(timer.copy_seconds), **quantiles_ms(timer.copy_seconds)}
    tier = None
    if timer.tiers:
        counters = timer.tiers[-1].stats()
        tier = {k: v for k, v in counters.items() if k != "store"}
        tier["call_s"] = timer.call_seconds
        tier["load_job_s"] = timer.load_job_seconds
    result = {"runs": runs, "wall": wall, "stall": probe.summary(), "tier": tier,
              "copies": copies, "lmtier_step": quantiles_ms(timer.step_seconds),
              "long_calls": timer.long_calls,
              "lmtier": integration.__file__}  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    del llm


if __name__ == "__main__":
    main(sys.argv[1])
