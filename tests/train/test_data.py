"""Training data: labels on assistant output only, media paths, validation, too-long samples."""

import base64
import io
import json

import pytest
from PIL import Image

from qwen2vl.processor import load_processor
from qwen2vl.train import DataError, TrainConfig, encode_conversation, validate
from qwen2vl.train.data import merge_reports, validate_file


@pytest.fixture(scope="module")
def proc():
    return load_processor(None)


def labelled_text(sample, tok) -> list[str]:
    """The trained stretches of a sample, decoded."""
    runs, current = [], []
    for label in sample.labels + [-100]:
        if label == -100:
            if current:
                runs.append(tok.decode(current))
            current = []
        else:
            current.append(label)
    return runs


def test_labels_cover_assistant_text_and_im_end_only(tmp_path, proc, helpers):
    helpers.write_image(tmp_path / "a.png", (56, 84), 0)
    image = {"type": "image", "image": str(tmp_path / "a.png")}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    sample = encode_conversation(messages, proc)
    tok = proc.tokenizer
    assert labelled_text(sample, tok) == ["A cat.<|im_end|>", "Yes.<|im_end|>"]
    pads = [i for i, t in enumerate(sample.ids) if t == tok.image_pad_id]
    assert len(pads) == sample.visuals[0].tokens == 6  # 56x84 -> 2x3 merged tokens
    assert all(sample.labels[i] == -100 for i in pads)
    assert sample.targets == len(tok.encode("A cat.")) + len(tok.encode("Yes.")) + 2


def test_visual_tokens_in_an_assistant_turn_are_masked(tmp_path, proc, helpers):
    helpers.write_image(tmp_path / "a.png", (56, 56), 0)
    image = {"type": "image", "image": str(tmp_path / "a.png")}
    messages = [
        {"role": "user", "content": "Draw."},
        {"role": "assistant", "content": [image, {"type": "text", "text": "Done."}]},
    ]
    sample = encode_conversation(messages, proc)
    assert labelled_text(sample, proc.tokenizer) == ["Done.<|im_end|>"]


def test_media_paths_resolve_against_the_data_file_and_data_uris_work(
    tmp_path, monkeypatch, helpers
):
    (tmp_path / "data" / "img").mkdir(parents=True)
    helpers.write_image(tmp_path / "data" / "img" / "a.png", (56, 56), 0)
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), "red").save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    lines = [
        json.dumps({"messages": helpers.conversation("img/a.png", "q", "a"), "id": 7}),
        json.dumps(helpers.conversation(uri, "q", "a")),  # a bare message list
    ]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # not the data file's directory
    cfg = TrainConfig(data=str(tmp_path / "data" / "train.jsonl"), output="unused")
    data, report = validate(cfg)
    assert not report.problems and len(data.info) == 2
    assert data[0].visuals[0].grid_thw == (1, 4, 4)


def test_validation_reports_every_bad_line_with_its_number(make_data, tmp_path, helpers):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = [
        "{not json",
        json.dumps({"messages": helpers.conversation("img/missing.png", "q", "a")}),
        json.dumps({"messages": helpers.conversation("broken.png", "q", "a")}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
        json.dumps({"conversation": []}),
    ]
    path = make_data(2, bad)
    cfg = TrainConfig(data=str(path), output="unused")
    with pytest.raises(DataError) as err:
        validate(cfg)
    text = str(err.value)
    for number, words in [
        (3, "not valid JSON"),
        (4, "missing.png"),
        (5, "broken.png"),
        (6, "no assistant turn"),
        (7, "unknown part type"),
        (8, '{"messages": [...]}'),
    ]:
        assert f"train.jsonl:{number}: " in text and words in text, (number, text)
    data, report = validate(TrainConfig(data=str(path), output="unused", on_bad_line="skip"))
    assert [r.line for r in report.records] == [1, 2] and len(report.problems) == 6


def test_too_long_sample_is_shrunk_never_cut(tmp_path, proc, helpers):
    helpers.write_image(tmp_path / "big.png", (448, 448), 0)  # 16x16 merged = 256 tokens
    line = json.dumps(helpers.conversation("big.png", "Describe.", "Noise."))
    (tmp_path / "train.jsonl").write_text(line + "\n")
    report = validate_file(tmp_path / "train.jsonl", proc, max_tokens=120)
    (record,) = report.records
    assert record.info.tokens <= 120 and "shrunk" in report.notes[0][1]
    sample = encode_conversation(record.messages, proc)
    (visual,) = sample.visuals
    t, h, w = visual.grid_thw
    assert sample.ids.count(proc.tokenizer.image_pad_id) == visual.tokens == t * h * w // 4
    assert visual.pixel_values.shape[0] == t * h * w  # features and tokens still match

    dropped = validate_file(tmp_path / "train.jsonl", proc, max_tokens=120, too_long="drop")
    assert not dropped.records and "dropped" in dropped.notes[0][1]


def test_too_long_text_is_dropped(tmp_path, proc, helpers):
    line = json.dumps(helpers.conversation(None, "word " * 200, "ok"))
    (tmp_path / "train.jsonl").write_text(line + "\n")
    report = validate_file(tmp_path / "train.jsonl", proc, max_tokens=64)
    assert not report.records and report.notes[0][0] == 1


def test_validation_split_over_processes_merges_to_the_whole(make_data, proc):
    path = make_data(5, ["{bad"])
    whole = validate_file(path, proc, max_tokens=512)
    parts = [validate_file(path, proc, max_tokens=512, shard=(k, 2)) for k in range(2)]
    merged = merge_reports(parts)
    assert [r.line for r in merged.records] == [r.line for r in whole.records] == [1, 2, 3, 4, 5]
    assert merged.problems == whole.problems and merged.lines == whole.lines == 6
    assert [r.info for r in merged.records] == [r.info for r in whole.records]


def grounding_sample(model_type: str, answer: str):
    from qwen2vl.media import MediaConfig
    from qwen2vl.processor import Processor

    base = load_processor(None)
    processor = Processor(
        base.tokenizer,
        MediaConfig(min_pixels=28 * 28, max_pixels=644 * 308),
        model_type=model_type,
    )
    messages = [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (1000, 500))}]},
        {"role": "assistant", "content": answer},
    ]
    sample = encode_conversation(messages, processor)
    return "".join(labelled_text(sample, processor.tokenizer))


def test_pixel_boxes_are_rescaled_to_the_resized_image_for_pixel_frame_families():
    # 1000x500 becomes 616x308: x and y * 0.616.
    answer = '{"bbox_2d": [100, 50, 500, 250], "label": "dog"} and '
    answer += "<|box_start|>(0,0),(1000,500)<|box_end|>"
    text = grounding_sample("qwen2_5_vl", answer)
    assert '{"bbox_2d": [62, 31, 308, 154], "label": "dog"}' in text
    assert "<|box_start|>(0,0),(616,308)<|box_end|>" in text
    # Qwen2-VL's 0..999 boxes do not depend on the size: untouched.
    assert '{"bbox_2d": [100, 50, 500, 250], "label": "dog"}' in grounding_sample(
        "qwen2_vl", answer
    )
