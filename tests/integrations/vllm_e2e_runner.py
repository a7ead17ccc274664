"""One vLLM engine (CPU build) run for test_vllm_engine_e2e: ``python vllm_e2e_runner.py ARGS``.

ARGS is a JSON file: model folder, prompts (token ids), and optionally the engine's
``--kv-transfer-config`` as a JSON mapping.  Prints one JSON line: per prompt the cached-token
count and the greedy output tokens, plus the lmtier tier's counters.  The engine core runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the tier object can be read after the run.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(path: str) -> None:
    import lmtier.integrations.vllm as integration

    tiers: list[integration.LmtierSecondaryTier] = []
    init = integration.LmtierSecondaryTier.__init__

    def remember(self: integration.LmtierSecondaryTier, *a: object, **k: object) -> None:
        init(self, *a, **k)
        tiers.append(self)

    integration.LmtierSecondaryTier.__init__ = remember  # type: ignore[method-assign]

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    with open(path) as file:
        args = json.load(file)
    kwargs = {}
    if args.get("kv_transfer_config"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**args["kv_transfer_config"])
    llm = LLM(
        model=args["model"],
        skip_tokenizer_init=True,
        dtype="float32",
        block_size=args["block_size"],
        max_model_len=1024,
        num_gpu_blocks_override=args["gpu_blocks"],
        enable_prefix_caching=True,
        enforce_eager=True,
        seed=0,
        **kwargs,
    )
    params = SamplingParams(max_tokens=8, temperature=0.0, detokenize=False)
    runs = []
    for prompt in args["prompts"]:
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        # generate() returns with the request's offloading jobs still in flight; a serving
        # loop steps on until they end, and so does this run before it reads the tier.
        while llm.llm_engine.engine_core.engine_core.scheduler.has_requests():
            llm.llm_engine.step()
        runs.append(
            {"cached": out.num_cached_tokens or 0, "tokens": list(out.outputs[0].token_ids)}
        )
    stats = None
    if tiers:
        stats = {k: v for k, v in tiers[-1].stats().items() if k != "store"}
    result = {"runs": runs, "tier": stats, "lmtier": integration.__file__}
    print("RESULT " + json.dumps(result), flush=True)
    del llm


if __name__ == "__main__":
    main(sys.argv[1])
