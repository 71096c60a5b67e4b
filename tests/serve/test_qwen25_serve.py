"""The server on a Qwen2.5-VL checkpoint answers the openai client as the Pipeline does: images,
and videos whose frame rate puts them elsewhere on M-RoPE's time axis."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_qwen25 import tiny_checkpoint

import qwen2vl


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny25-serve"))


def frames(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)) for _ in range(n)]


def test_answers_equal_the_pipelines(ckpt, start_server, helpers):
    picture = helpers.picture(seed=5, size=(120, 90))
    asks = [
        [{"type": "image_url", "image_url": {"url": helpers.data_uri(picture)}},
         {"type": "text", "text": "What is this?"}],
        [{"type": "video", "video": [helpers.data_uri(f) for f in frames()], "sample_fps": 4},
         {"type": "text", "text": "What happens?"}],
    ]  # fmt: skip
    local = [
        [{"type": "image", "image": picture}, asks[0][1]],
        [{"type": "video", "video": frames(), "sample_fps": 4}, asks[1][1]],
    ]
    pipe = qwen2vl.Pipeline.from_pretrained(ckpt, dtype="float32")
    with start_server(ckpt) as server:
        client = server.client()
        for content, same in zip(asks, local, strict=True):
            reply = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": content}],
                max_tokens=10,
                temperature=0,
            )
            want = pipe.complete([{"role": "user", "content": same}], max_new_tokens=10)
            assert reply.choices[0].message.content == want.text
