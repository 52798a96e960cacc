"""Run by pipeline_test.py in fresh processes: resume from a saved state; 2-process sharding.

python tests/data/pipeline_worker.py resume <out.npz> <state.json> <k> <m> [restore]
python tests/data/pipeline_worker.py multihost <out_prefix> <process_id> <port>
"""

from __future__ import annotations

import json
import os
import sys


def kjv_batches(**kwargs):
    from distill_jax import assets
    from distill_jax.data import pipeline, sources
    from distill_jax.data.tokenizers import load_tokenizer

    tok = load_tokenizer(assets.smollm2_gguf_path())
    texts = [text for _, text in sources.kjv_chapters()[:60]]
    encode = pipeline.text_encoder(tok)
    return pipeline.TokenBatches(
        texts, encode, seq_len=256, global_batch_size=4, seed=3, long_documents="split", **kwargs
    )


def resume(out, state_path, k, m, restore=False):
    import numpy as np

    it = kjv_batches()
    if restore:
        with open(state_path) as f:
            it.set_state(json.load(f))
        batches = [next(it) for _ in range(m)]
    else:
        batches = [next(it) for _ in range(k)]
        with open(state_path, "w") as f:
            json.dump(it.get_state(), f)
    np.savez(out, **{f"{i}/{key}": v for i, b in enumerate(batches) for key, v in b.items()})


def multihost(prefix, process_id, port):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    from distill_jax import sharding
    from distill_jax.data import pipeline

    seen = []
    docs = [list(range(1000 * i, 1000 * i + 3 + i % 11)) for i in range(50)]

    def encode(doc):
        seen.append(doc[0] // 1000)  # which documents this process reads
        return doc

    it = pipeline.TokenBatches(
        docs, encode, seq_len=16, global_batch_size=4, num_epochs=1, num_batches=12
    )
    mesh = sharding.make_mesh((("data", -1),))
    local, full = [], []
    for batch in it:
        arrays = pipeline.global_batch(batch, mesh)
        local.append(batch["input_ids"])
        full.append(multihost_utils.process_allgather(arrays["input_ids"], tiled=True))
    np.savez(
        f"{prefix}{process_id}.npz",
        seen=np.asarray(seen),
        local=np.stack(local),
        full=np.stack(full),
        devices=np.asarray([jax.device_count(), jax.process_count()]),
    )


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "resume":
        resume(args[0], args[1], int(args[2]), int(args[3]), restore=len(args) > 4)
    else:
        multihost(args[0], int(args[1]), int(args[2]))
