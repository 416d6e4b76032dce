"""The job file: defaults from the reference workflow, clear errors naming file and field."""

import json

import pytest

from config import REFERENCE_LORA, JobFileError, StageParameters, job_schema, parse_job_file


def parse(data, defaults=None):
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return parse_job_file(raw, "inbox/job.json", defaults or StageParameters())


def test_absent_parameters_take_the_reference_workflow_defaults():
    job, params = parse({"prompt": "p", "image1": "a.png"})
    assert (params.megapixels, params.upscale_method, params.shift, params.cfg_norm_strength) == (1.0, "lanczos", 3.0, 1.0)
    assert (params.steps, params.cfg, params.sampler, params.scheduler, params.denoise) == (4, 1.0, "euler", "simple", 1.0)
    assert (params.lora, params.lora_strength, params.output_format) == (REFERENCE_LORA, 1.0, "png")
    assert job.seed is None


def test_job_values_win_over_configured_defaults():
    _, params = parse({"prompt": "p", "image1": "a.png", "steps": 8}, StageParameters(steps=20, cfg=2.5))
    assert (params.steps, params.cfg) == (8, 2.5)


def test_lora_none_runs_without_a_lora():
    _, params = parse({"prompt": "p", "image1": "a.png", "lora": "none"})
    assert params.lora is None


@pytest.mark.parametrize("data, field, words", [
    ({"prompt": "p", "image1": "a.png", "step": 8}, "step", "unknown key"),
    ({"prompt": "p", "image1": "a.png", "steps": "many"}, "steps", "integer"),
    ({"prompt": "p", "image1": "a.png", "steps": 0}, "steps", "greater than or equal to 1"),
    ({"prompt": "p", "image1": "a.png", "denoise": 1.5}, "denoise", "less than or equal to 1"),
    ({"prompt": "p", "image1": "a.png", "output_format": "gif"}, "output_format", "png"),
    ({"image1": "a.png"}, "prompt", "required"),
    ({"prompt": "p", "image1": "a.png", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "p", "image1": "a.png", "lora": "../x.safetensors"}, "lora", "not a path"),
    ({"prompt": "p", "image1": "a.png", "output_name": "../up"}, "output_name", "plain file name"),
    ({"prompt": "p", "image1": "a.png", "width": 512}, "width", "together"),
])
def test_bad_values_are_rejected_naming_the_file_and_the_field(data, field, words):
    with pytest.raises(JobFileError) as caught:
        parse(data)
    assert caught.value.field == field
    message = str(caught.value)
    assert message.startswith(f"inbox/job.json: field '{field}'") and words in message


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "p", ', "invalid JSON at line 1"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_unreadable_job_files_are_rejected_with_the_reason(raw, words):
    with pytest.raises(JobFileError, match=words):
        parse(raw)


def test_the_schema_lists_every_parameter_with_a_description():
    schema = job_schema()
    assert schema["required"] == ["prompt", "image1"]
    assert schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
