"""Where each change goes: no import cycles, engines by name, one declaration per stage, typed
values between layers (older stored specs read through an upgrade)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from config import JobSpec, StageParameters, load_settings
from stages import BY_NAME, STAGES, ModelCache, RetryableError, create_engine, engine_operation
from stages.definitions import needed_stages

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "db", "stages", "processor", "web")


def module_imports() -> dict[str, set[str]]:
    """Each project module and the project modules it imports at module level (not inside
    functions, which run only when called)."""
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for package in PACKAGES if (ROOT / package).is_dir() for path in (ROOT / package).rglob("*.py")
               if "migrations" not in path.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks are not run
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = found
    return graph


def test_no_module_imports_itself_through_others():
    graph = module_imports()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for following in graph[node]:
            if following in path:
                cycles.append(path[path.index(following):] + [following])
            elif len(path) < 30 and following not in done:
                visit(following, path + [following])
        done.add(node)

    done: set[str] = set()
    for module in graph:
        visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_processor_imports_no_engine_library_at_module_level():
    graph = module_imports()
    for name, path in ((n, ROOT / (n.replace(".", "/") + ".py")) for n in graph if n.startswith("processor.")):
        top = {node.names[0].name for node in ast.parse(path.read_text()).body if isinstance(node, ast.Import)}
        top |= {node.module for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.ImportFrom) and node.module}
        assert not top & {"torch", "diffusers", "transformers"}, f"{name} imports an engine library"


def test_engines_are_chosen_by_name_and_an_unknown_one_is_named_in_the_error(tmp_path):
    engine = create_engine(load_settings(None, engine="fake", work=tmp_path), ModelCache())
    assert engine.name == "fake"
    settings = load_settings(None, engine="fake", work=tmp_path).model_copy(update={"engine": "nonesuch"})
    with pytest.raises(ValueError, match="unknown engine 'nonesuch'; the engines are diffusers, comfyui, fake"):
        create_engine(settings, ModelCache())


def test_running_out_of_device_memory_becomes_a_retryable_error_that_keeps_its_cause():
    @engine_operation
    def sample():
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(RetryableError, match="out of device memory") as caught:
        sample()
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_each_stage_is_declared_once_and_the_final_stage_is_what_a_job_needs():
    assert [stage.name for stage in STAGES] == ["prepare", "encode_text", "encode_latent", "sample", "decode"]
    assert [stage.name for stage in STAGES if stage.final] == ["decode"]
    assert BY_NAME["sample"].steps_for(StageParameters(steps=7)) == 7 and BY_NAME["decode"].steps_for(
        StageParameters()) is None
    chain = {stage.name: f"fp-{stage.name}" for stage in STAGES}
    assert needed_stages(chain, {"fp-prepare", "fp-encode_text", "fp-encode_latent"}) == ["sample", "decode"]
    assert needed_stages(chain, {"fp-decode"}) == []


def test_a_job_spec_stored_by_the_first_version_is_read_through_the_upgrade():
    stored = {"job_file": {"prompt": "make it winter", "image1": "a.png"}, "job_file_name": "job.json",
              "prompt": "make it winter", "negative_prompt": "", "images": {"image1": "a.png"},
              "seed_source": "job file", "parameters": {**StageParameters().model_dump(mode="json"), "steps": 8},
              "is_folder": True, "preset": None, "outbox_subfolder": None, "seed": 3, "output_name": "a"}
    spec = JobSpec.from_stored(stored)
    assert (spec.version, spec.seed, spec.parameters.steps, spec.output_name) == (2, 3, 8, "a")
    assert JobSpec.from_stored(spec.stored()) == spec
    with pytest.raises(ValueError):
        JobSpec.from_stored(["not", "an", "object"])
