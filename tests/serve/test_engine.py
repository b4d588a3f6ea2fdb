"""The engine's batching rules with a stand-in pipeline that records its calls: requests merge
only with requests of the same key (size, steps, sampler, guidance, negative prompt, cache, LoRAs,
input image), up to max_batch images, oldest first; each image keeps its own seed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from fastflow.serve.engine import Engine
from fastflow.serve.metrics import Metrics
from fastflow.serve.protocol import Work


class RecordingPipe:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts, seed, callback, **kwargs):
        from PIL import Image

        self.calls.append((list(prompts), list(seed), kwargs))
        for i in range(2):
            callback(i, 2, None)
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), s % 256) for s in seed], seeds=list(seed),
                               settings={"dtype": "float32"})  # fmt: skip

    def interrupt(self):
        pass


def work(prompt, seeds, **changes):
    base = {"width": 16, "height": 16, "steps": 4, "sampler": "euler"}
    return Work(prompt, seeds, **{**base, **changes})


def run_engine(works, max_batch, **kwargs):
    """Queues every work before the worker starts, then lets it drain the queue."""
    pipe = RecordingPipe()

    async def main():
        engine = Engine(lambda: pipe, max_batch, 100, 50, Metrics(), None)
        engine.ready.set()
        jobs = [engine.submit(w, 60) for w in works]
        engine.start()
        results = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 60)
        await asyncio.to_thread(engine.stop, 30)
        return results

    return pipe.calls, asyncio.run(main())


def test_same_key_merges_up_to_max_batch():
    works = [work(f"p{i}", [i]) for i in range(5)]
    calls, results = run_engine(works, 2)
    assert [c[0] for c in calls] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert [c[1] for c in calls] == [[0, 1], [2, 3], [4]]
    assert [[seed for _, seed in images] for images, _ in results] == [[0], [1], [2], [3], [4]]


def test_different_keys_do_not_merge():
    works = [work("a", [1]), work("b", [2], width=32), work("c", [3]), work("d", [4], negative_prompt="x"),
             work("e", [5], loras=(("style", 0.5),)), work("f", [6], loras=(("style", 0.7),)),
             work("g", [7], cache="fbcache"), work("h", [8], steps=5), work("i", [9])]  # fmt: skip
    calls, _ = run_engine(works, 8)
    assert [c[0] for c in calls] == [["a", "c", "i"], ["b"], ["d"], ["e"], ["f"], ["g"], ["h"]]
    assert calls[1][2]["width"] == 32 and calls[2][2]["negative_prompt"] == "x" and calls[5][2]["cache"] == "fbcache"


def test_requests_keep_their_images_together():
    works = [work("a", [10, 11, 12]), work("b", [20, 21]), work("c", [30, 31, 32, 33, 34])]
    calls, results = run_engine(works, 4)
    assert [c[1] for c in calls] == [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]  # 3 + 2 > 4: no merge
    assert [[s for _, s in images] for images, _ in results] == [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
