"""The ComfyUI engine: the reference workflow's own nodes, from the user's ComfyUI checkout.

ComfyUI is used as a library, headless: its checkout (setting ``comfyui_path``) goes on
``sys.path``, its command-line options are set from our settings before its model management
loads (``--cpu``, ``--lowvram``/``--normalvram``/``--highvram``/``--novram``,
``--reserve-vram``, the dtype flags) and the user's own ComfyUI options (``comfyui_args``, read by
ComfyUI's parser), and its built-in extra nodes are registered, custom nodes only with
``comfyui_custom_nodes``, API nodes never. Model files are found through ComfyUI's
``folder_paths``, so the usual ``models/`` folders and ``extra_model_paths.yaml`` files work as in
ComfyUI itself. This happens once per process.

Each stage calls exactly the nodes of the reference workflow (see ``stages/comfyui_nodes.py``
for the mapping of job parameters to node arguments):

- ``encode_latent``: VAELoader, VAEEncode (or EmptySD3LatentImage for a custom output size)
- ``encode_text``: CLIPLoader (type ``qwen_image``), TextEncodeQwenImageEditPlus for the prompt
  and (unless cfg is 1, where KSampler never reads it) the negative prompt, with image1..3 and
  the VAE (or, in ``raw_latent`` mode, without the VAE and with one ReferenceLatent per
  VAE-encoded image)
- ``sample``: UNETLoader, LoraLoaderModelOnly, ModelSamplingAuraFlow, CFGNorm, then KSampler's
  computation through ComfyUI's sampling API, so that it can stop and resume between steps
- ``decode``: VAEDecode, and SaveImage's conversion to 8 bits

Sampling does what KSampler does (same noise, same sigma schedule for the scheduler, steps and
denoise, same guider), with one difference in form: for samplers whose only state between steps
is the latent (euler, heun) the sampler function is called one step at a time, which gives the
same bits, and the latent after each step is handed to ``on_step`` so that an interrupted run
continues from it to the byte-identical result. Other samplers run in one call and restart from
the beginning after an interruption.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from config import Settings, StageParameters
from stages import comfyui_nodes as mapping
from stages.comfyui_graph import GraphModels, api_graph, png_text
from stages.comfyui_nodes import MappingError, NodeCall, Ref
from stages.engine import Check, Payload, SampleResume, StageInterrupted, StepCallback, engine_operation
from stages.errors import ModelNotFoundError, PermanentError
from stages.model_cache import ModelCache

log = logging.getLogger(__name__)

_BOOT_LOCK = threading.RLock()
_BOOTED: Optional["ComfyUI"] = None


class ComfyUI:
    """A booted ComfyUI: its modules and where it came from."""

    def __init__(self, path: Path, version: str, commit: Optional[str], modules: dict[str, Any],
                 arguments: dict[str, Any]):
        self.path = path
        self.version = version
        self.commit = commit
        self.arguments = arguments
        self.nodes = modules["nodes"]
        self.folder_paths = modules["folder_paths"]
        self.extra_config = modules["utils.extra_config"]
        self.model_management = modules["comfy.model_management"]
        self.samplers = modules["comfy.samplers"]
        self.sample = modules["comfy.sample"]
        self.cli_args = modules["comfy.cli_args"].args

    def describe(self) -> str:
        return f"ComfyUI {self.version}" + (f" ({self.commit})" if self.commit else "")

    def node(self, name: str, **kwargs: Any) -> Any:
        """Run node ``name`` and return its first output (classic and V3 nodes alike)."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[name]
        if hasattr(cls, "define_schema"):  # V3 node: a classmethod ``execute``
            result = cls.execute(**kwargs)
            if asyncio.iscoroutine(result):
                result = _run_coroutine(result)
        else:
            result = getattr(cls(), cls.FUNCTION)(**kwargs)
        return result[0]

    def run(self, call: NodeCall, refs: dict[str, Any]) -> Any:
        kwargs = {key: refs[value.name] if isinstance(value, Ref) else value for key, value in call.kwargs.items()}
        return self.node(call.node, **kwargs)

    def find_model(self, folder: str, name: str) -> Path:
        """The path of model file ``name`` in ComfyUI folder ``folder``; ModelNotFoundError listing
        every folder searched when it is in none of them."""
        path = self.folder_paths.get_full_path(folder, name)
        if path is None:
            searched = self.folder_paths.get_folder_paths(folder)
            raise ModelNotFoundError(
                f"model file {name!r} not found in ComfyUI's '{folder}' folders; searched: "
                + (", ".join(searched) if searched else "(none configured)")
                + ". Put the file there or add a folder through extra_model_paths.yaml")
        return Path(path)

    def add_extra_model_paths(self, yaml_path: Path) -> None:
        """Read an ``extra_model_paths.yaml`` the way ComfyUI's ``main.py`` does."""
        try:
            self.extra_config.load_extra_path_config(str(yaml_path))
        except Exception as exc:  # yaml errors, a missing base_path...
            raise PermanentError(f"cannot read ComfyUI model paths file {yaml_path}: {exc}") from exc


def _run_coroutine(coroutine: Any) -> Any:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        return asyncio.run(coroutine)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="comfyui-async")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# Booting -----------------------------------------------------------------------------------------

def read_version(path: Path) -> str:
    """ComfyUI's version from its ``comfyui_version.py`` (read, not imported)."""
    try:
        text = (path / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return match.group(1) if match else "unknown"


def read_commit(path: Path) -> Optional[str]:
    """The checkout's git commit, or None when it is not a git checkout (or git is missing)."""
    try:
        result = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def check_checkout(path: Optional[Path]) -> Path:
    """``path`` if it looks like a ComfyUI checkout; PermanentError saying what is wrong otherwise."""
    if path is None:
        raise PermanentError("engine 'comfyui' needs comfyui_path (QIE_COMFYUI_PATH): the folder of a "
                             "ComfyUI checkout")
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise PermanentError(f"comfyui_path {path} does not exist or is not a folder")
    missing = [name for name in ("nodes.py", "folder_paths.py", "comfy/cli_args.py", "comfy/model_management.py")
               if not (path / name).is_file()]
    if missing:
        raise PermanentError(f"comfyui_path {path} is not a ComfyUI checkout (missing {', '.join(missing)})")
    version = read_version(path)
    if version != "unknown" and mapping.version_tuple(version) < mapping.version_tuple(mapping.MINIMUM_VERSION):
        raise PermanentError(f"ComfyUI {version} at {path} is too old; Qwen-Image-Edit-2509 needs "
                             f"{mapping.MINIMUM_VERSION} or newer")
    return path


def boot(settings: Settings) -> ComfyUI:
    """Import ComfyUI from ``settings.comfyui_path`` once per process, configured by ``settings``."""
    global _BOOTED
    with _BOOT_LOCK:
        path = check_checkout(settings.comfyui_path)
        if _BOOTED is not None:
            if _BOOTED.path != path:
                raise PermanentError(f"ComfyUI is already loaded from {_BOOTED.path} in this process; "
                                     f"cannot also use {path} (restart to switch)")
            return _BOOTED
        _BOOTED = _boot(path, settings)
        return _BOOTED


def _boot(path: Path, settings: Settings) -> ComfyUI:
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        origin = Path(getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", [""])))).resolve()
        if path not in origin.parents:
            raise PermanentError(f"a different ComfyUI is already imported in this process ({origin}); "
                                 f"cannot use {path}")
    version = read_version(path)
    try:
        arguments = mapping.boot_arguments(settings.device, settings.vram_mode, settings.reserve_vram_gb,
                                           settings.dtype, torch.cuda.is_available())
    except MappingError as exc:
        raise PermanentError(str(exc)) from exc
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    modules: dict[str, Any] = {}
    try:
        cli_args = importlib.import_module("comfy.cli_args")
        if "comfy.model_management" in sys.modules:
            log.warning("ComfyUI's model management was imported before the engine booted it; "
                        "device and memory settings may not apply")
        for name, value in arguments.items():
            if not hasattr(cli_args.args, name):
                log.warning("this ComfyUI has no option %r; ignored", name)
                continue
            setattr(cli_args.args, name, value)
        _apply_user_arguments(cli_args, settings.comfyui_args, arguments)
        index = mapping.cuda_index(settings.device)
        if index is not None:
            if index >= torch.cuda.device_count():
                raise PermanentError(f"device {settings.device!r}: there are only {torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(index)
        # ComfyUI's own start-up order: its ``utils`` package before ``nodes``, which puts
        # ``comfy/`` first on sys.path (where a module ``utils`` would otherwise be found).
        modules["comfy.cli_args"] = cli_args
        for name in ("utils.extra_config", "folder_paths", "comfy.model_management", "nodes",
                     "comfy.samplers", "comfy.sample"):
            modules[name] = importlib.import_module(name)
    except BaseException as exc:
        _forget(path)
        if isinstance(exc, PermanentError) or not isinstance(exc, Exception):
            raise
        raise PermanentError(
            f"cannot import ComfyUI from {path}: {type(exc).__name__}: {exc}. Run the daemon with the "
            f"Python environment ComfyUI runs in, with ComfyUI's requirements.txt installed") from exc
    nodes = modules["nodes"]
    comfy = ComfyUI(path, version, read_commit(path), modules, arguments)
    _apply_model_paths(comfy, settings)  # before the nodes, as ComfyUI's main.py (custom_nodes folders)
    try:
        # Custom nodes only when asked for (``--disable-all-custom-nodes``/``--whitelist-custom-nodes``
        # in comfyui_args then act as in ComfyUI); API nodes never (they call a web service).
        _run_coroutine(nodes.init_extra_nodes(init_custom_nodes=settings.comfyui_custom_nodes, init_api_nodes=False))
    except Exception as exc:
        raise PermanentError(f"ComfyUI at {path} failed to register its built-in nodes: {exc}") from exc
    missing = [name for name in mapping.REQUIRED_NODES if name not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise PermanentError(f"ComfyUI {version} at {path} lacks the nodes {', '.join(missing)} (an import "
                             f"error in comfy_extras, see the log above, or a version older than "
                             f"{mapping.MINIMUM_VERSION})")
    log.info("using %s from %s on %s", comfy.describe(), path, comfy.model_management.get_torch_device())
    return comfy


def _apply_user_arguments(cli_args: Any, flags: list[str], derived: dict[str, Any]) -> None:
    """Set the options a user gives (``comfyui_args``) as ComfyUI's parser reads them, after the
    ones derived from the settings (a flag the user gives wins), with ComfyUI's own follow-ups."""
    try:
        given = mapping.user_arguments(cli_args.parser, flags)
    except MappingError as exc:
        raise PermanentError(str(exc)) from exc
    if "fast" in given:  # ComfyUI: ``--fast`` alone enables every optimisation, else the ones named
        given["fast"] = set(given["fast"]) if given["fast"] else set(cli_args.PerformanceFeature)
    if given.get("force_fp16"):
        given["fp16_unet"] = True
    for name, value in given.items():
        if name in mapping.SERVER_ONLY_OPTIONS:
            log.warning("comfyui_args: --%s is for ComfyUI's server and changes nothing here", name.replace("_", "-"))
            continue
        if name in derived and derived[name] != value:
            log.warning("comfyui_args: --%s=%r replaces %r from the settings", name.replace("_", "-"), value,
                        derived[name])
        setattr(cli_args.args, name, value)


def _forget(path: Path) -> None:
    """Undo a failed boot: the checkout off sys.path, its half-imported modules dropped."""
    for entry in (str(path), str(path / "comfy")):
        while entry in sys.path:
            sys.path.remove(entry)
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if origin and Path(origin).resolve().is_relative_to(path):
            del sys.modules[name]


def _apply_model_paths(comfy: ComfyUI, settings: Settings) -> None:
    """What ComfyUI's ``main.py`` adds to the model search paths at start-up."""
    checkout_yaml = comfy.path / "extra_model_paths.yaml"
    if checkout_yaml.is_file():
        comfy.add_extra_model_paths(checkout_yaml)
    for extra in settings.comfyui_extra_model_paths:
        comfy.add_extra_model_paths(Path(extra))
    for extra in itertools.chain(*(comfy.cli_args.extra_model_paths_config or [])):  # comfyui_args
        comfy.add_extra_model_paths(Path(extra))
    folder_paths = comfy.folder_paths
    output = folder_paths.get_output_directory()
    for folder in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, os.path.join(output, folder))


# The engine ---------------------------------------------------------------------------------------

class _Loaded:
    """A cached ComfyUI model object, sized for the ModelCache by its torch module's tensors."""

    def __init__(self, value: Any, module: Optional[torch.nn.Module]):
        self.value = value
        self.module = module

    def parameters(self):
        return self.module.parameters() if self.module is not None else iter(())

    def buffers(self):
        return self.module.buffers() if self.module is not None else iter(())


STAGE_MODELS = {"prepare": (), "encode_latent": ("vae",), "encode_text": ("text_encoder", "vae"),
                "sample": ("transformer",), "decode": ("vae",)}


class ComfyUIEngine:
    """The Engine protocol (stages/engine.py) on ComfyUI's nodes."""

    name = "comfyui"

    def __init__(self, settings: Settings, cache: ModelCache):
        self.settings = settings
        self.cache = cache
        # Results differ in the last bits between thread counts: fix it (DESIGN section 3).
        torch.set_num_threads(settings.effective_threads)
        self.comfy = boot(settings)

    # Identity ------------------------------------------------------------------------------------

    def version(self) -> str:
        # ComfyUI options the user gives (--fast, attention, dtype...) can change results: they are
        # part of the identity (and so of every fingerprint) when there are any.
        options = f"; options {' '.join(self.settings.comfyui_args)}" if self.settings.comfyui_args else ""
        return f"{self.comfy.describe()}; torch {torch.__version__}{options}"

    def output_metadata(self, prompt: str, negative_prompt: str, seed: int, images: Sequence[str],
                        params: StageParameters) -> dict[str, str]:
        """ComfyUI's ``prompt`` and ``workflow`` text chunks for the job as run (stages/comfyui_graph.py);
        none with ComfyUI's ``--disable-metadata`` (in comfyui_args), as its SaveImage does."""
        if self.comfy.cli_args.disable_metadata:
            return {}
        models = GraphModels(self.settings.vae_name, self.settings.text_encoder_name,
                             self.settings.diffusion_model_name, self.settings.weight_dtype)
        return png_text(api_graph(models, prompt, negative_prompt, seed, images, params))

    def device_name(self) -> str:
        mm = self.comfy.model_management
        device = mm.get_torch_device()
        if device.type == "cpu":
            return f"cpu ({torch.get_num_threads()} threads)"
        return f"{mm.get_torch_device_name(device)}"

    def model_identities(self, params: StageParameters) -> dict[str, str]:
        return {"vae": self._identify("vae", self.settings.vae_name),
                "text_encoder": self._identify("text_encoder", self.settings.text_encoder_name),
                "transformer": self._transformer_identity(params)}

    def _transformer_identity(self, params: StageParameters) -> str:
        model = self._identify("transformer", self.settings.diffusion_model_name)
        lora = self._identify("lora", params.lora) if params.lora else None
        return mapping.transformer_identity(model, self.settings.weight_dtype, lora, params.lora_strength)

    def _identify(self, role: str, name: str) -> str:
        path = self.comfy.find_model(mapping.MODEL_FOLDERS[role], name)
        stat = path.stat()
        return mapping.file_identity(name, stat.st_size, stat.st_mtime_ns)

    def stage_models(self, stage: str, params: StageParameters) -> tuple[str, ...]:
        return STAGE_MODELS[stage]

    def load_models(self, stage: str, params: StageParameters) -> None:
        loaders = {"vae": self._vae, "text_encoder": self._text_encoder,
                   "transformer": lambda: self._transformer(params)}
        for role in STAGE_MODELS[stage]:
            loaders[role]()

    def model_bytes(self, params: StageParameters) -> dict[str, int]:
        """Estimates of each role's size once loaded: the size of its file."""
        sizes = {}
        for role, name in (("vae", self.settings.vae_name), ("text_encoder", self.settings.text_encoder_name),
                           ("transformer", self.settings.diffusion_model_name)):
            try:
                sizes[role] = self.comfy.find_model(mapping.MODEL_FOLDERS[role], name).stat().st_size
            except (ModelNotFoundError, OSError):
                sizes[role] = 0
        return sizes

    @classmethod
    def max_aspect_ratio(cls, settings: Settings) -> tuple[float, str]:
        """TextEncodeQwenImageEditPlus gives the vision tower about 384x384 pixels of each image,
        whose processor (Qwen2.5-VL's) takes at most 200:1."""
        return 200.0, "Qwen2.5-VL's image processor takes at most 200:1"

    @classmethod
    def diagnose(cls, settings: Settings) -> list[Check]:
        report = comfyui_report(settings)
        return [Check("comfyui", bool(report.get("ok")), str(report.get("summary", report)), report)]

    # Loading (every model goes through the cache) -----------------------------------------------

    def _vae(self) -> Any:
        name = self.settings.vae_name
        return self._model_file("vae", name, mapping.vae_loader(name), "first_stage_model")

    def _text_encoder(self) -> Any:
        name = self.settings.text_encoder_name
        return self._model_file("text_encoder", name, mapping.clip_loader(name), "cond_stage_model")

    def _model_file(self, role: str, name: str, loader: NodeCall, torch_module: str) -> Any:
        """The model that ``loader`` makes from the file ``name``, cached under the file's identity;
        ``torch_module`` names its attribute that holds the weights (for the cache's size)."""

        def load() -> _Loaded:
            loaded = self._call(loader)
            return _Loaded(loaded, getattr(loaded, torch_module, None))

        return self.cache.get(mapping.cache_key(role, self._identify(role, name)), load, role).value

    def _transformer(self, params: StageParameters) -> Any:
        identity = self._transformer_identity(params)

        def load() -> _Loaded:
            model = self._call(mapping.unet_loader(self.settings.diffusion_model_name, self.settings.weight_dtype))
            for call in mapping.model_patches(params):
                model = self._call(call, model=model)
            return _Loaded(model, getattr(model, "model", None))

        key = mapping.cache_key("transformer", identity, params)
        return self.cache.get(key, load, "transformer").value

    def _call(self, call: NodeCall, **refs: Any) -> Any:
        with torch.inference_mode():
            try:
                return self.comfy.run(call, refs)
            except FileNotFoundError as exc:
                raise ModelNotFoundError(f"{call.node}: {exc}") from exc

    # Stages --------------------------------------------------------------------------------------

    @staticmethod
    def _images(prepared: Payload) -> list[torch.Tensor]:
        images = list(prepared["images"])
        if not 1 <= len(images) <= mapping.MAX_IMAGES:
            raise PermanentError(f"between 1 and {mapping.MAX_IMAGES} images, not {len(images)}")
        return [mapping.to_comfy_image(image) for image in images]

    @engine_operation
    def encode_latent(self, prepared: Payload, params: StageParameters) -> Payload:
        call = mapping.latent_source(params)
        refs: dict[str, Any] = {}
        if call.node == "VAEEncode":
            refs = {"image1": self._images(prepared)[0], "vae": self._vae()}
        latent = self._call(call, **refs)
        return _cpu(mapping.check_latent(dict(latent)))

    @engine_operation
    def encode_text(self, prepared: Payload, params: StageParameters, prompt: str,
                    negative_prompt: str) -> Payload:
        images = self._images(prepared)
        refs: dict[str, Any] = {f"image{i}": image for i, image in enumerate(images, start=1)}
        refs["clip"] = self._text_encoder()
        refs["vae"] = self._vae()
        if params.reference_mode == "raw_latent":
            for i, image in enumerate(images, start=1):
                refs[f"latent{i}"] = self._call(NodeCall("VAEEncode", {"pixels": Ref(f"image{i}"), "vae": Ref("vae")}),
                                                **refs)
        out: dict[str, Any] = {"negative": None}
        encode = (("positive", prompt),) if mapping.negative_unused(params.cfg) else (
            ("positive", prompt), ("negative", negative_prompt))
        for label, text in encode:
            conditioning = None
            for call in mapping.text_encode_calls(params.reference_mode, text, len(images)):
                conditioning = self._call(call, **refs, conditioning=conditioning)
            try:
                out[label] = _cpu(mapping.check_conditioning(conditioning))
            except MappingError as exc:
                raise PermanentError(f"{label} conditioning: {exc}") from exc
        return out

    @engine_operation
    def sample(self, prepared: Payload, latent: Payload, text: Payload, params: StageParameters,
               seed: int, resume: Optional[SampleResume], on_step: Optional[StepCallback],
               should_stop: Optional[Callable[[], bool]] = None) -> Payload:
        samplers = self.comfy.samplers
        try:
            mapping.check_sampler(params.sampler, params.scheduler, samplers.KSampler.SAMPLERS,
                                  samplers.KSampler.SCHEDULERS)
        except MappingError as exc:
            raise PermanentError(str(exc)) from exc
        model = self._transformer(params)
        with torch.inference_mode():
            sampled = self._sample(model, latent, text, params, seed, resume, on_step, should_stop)
        return _cpu(sampled)

    def _sample(self, model: Any, latent: dict, text: dict, params: StageParameters, seed: int,
                resume: Optional[SampleResume], on_step: Optional[StepCallback],
                should_stop: Optional[Callable[[], bool]]) -> Payload:
        """KSampler's computation (nodes.common_ksampler) with a resumable sampler function."""
        comfy_sample, samplers = self.comfy.sample, self.comfy.samplers
        args = mapping.ksampler_arguments(params, seed)
        latent_image = comfy_sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy_sample.prepare_noise(latent_image, args["seed"], latent.get("batch_index"))
        schedule = samplers.KSampler(model, steps=args["steps"], device=model.load_device,
                                     sampler=args["sampler_name"], scheduler=args["scheduler"],
                                     denoise=args["denoise"], model_options=model.model_options)
        sigmas = schedule.sigmas
        sampler = samplers.sampler_object(args["sampler_name"])
        stepwise = (isinstance(sampler, samplers.KSAMPLER) and not sampler.extra_options
                    and getattr(sampler.sampler_function, "__name__", "") in mapping.STEPWISE_SAMPLER_FUNCTIONS)
        steps_total = len(sigmas) - 1
        start, state = 0, None
        if resume is not None:
            state = _resume_state(resume, steps_total, latent_image.shape) if stepwise else None
            if state is None:
                log.warning("sample: cannot continue %s after step %d; starting again",
                            args["sampler_name"], resume.step)
            else:
                start = resume.step

        callback = None
        if stepwise:
            sampler = samplers.KSAMPLER(_stepwise(sampler.sampler_function, start, state, on_step, should_stop),
                                        sampler.extra_options, sampler.inpaint_options)
        elif should_stop is not None:
            def callback(step, denoised, x, total):
                if step + 1 < total and should_stop():
                    raise StageInterrupted(f"sample stopped after step {step + 1}")

        negative = mapping.sampler_negative(text, args["cfg"])
        samples = samplers.sample(model, noise, text["positive"], negative, args["cfg"], model.load_device,
                                  sampler, sigmas, model.model_options, latent_image=latent_image,
                                  denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True,
                                  seed=args["seed"])
        samples = samples.to(self.comfy.model_management.intermediate_device())
        out = dict(latent)
        out["samples"] = samples
        return out

    @engine_operation
    def decode(self, sampled: Payload, params: StageParameters) -> Payload:
        image = self._call(NodeCall("VAEDecode", {"samples": Ref("samples"), "vae": Ref("vae")}),
                           samples=mapping.check_latent(sampled), vae=self._vae())
        decoded = {"image": mapping.saved_pixels(image)}
        if params.bit_depth != 8:
            decoded["image16"] = mapping.saved_pixels16(image)
        return decoded


def _resume_state(resume: SampleResume, steps_total: int, shape: torch.Size) -> Optional[torch.Tensor]:
    state = resume.state
    x = state.get("x") if isinstance(state, dict) else None
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape) or not 0 < resume.step < steps_total:
        return None
    if state.get("steps_total") not in (None, steps_total):
        return None
    return x


def _stepwise(function: Callable, start: int, state: Optional[torch.Tensor], on_step: Optional[StepCallback],
              should_stop: Optional[Callable[[], bool]]) -> Callable:
    """A sampler function that runs ``function`` one sigma interval at a time from step ``start``
    (from ``state`` instead of the noised latent when resuming), reporting each step."""

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        total = len(sigmas) - 1
        if state is not None:
            x = state.to(device=x.device, dtype=x.dtype)
        for i in range(start, total):
            if i > start and should_stop is not None and should_stop():
                raise StageInterrupted(f"sample stopped after step {i}")
            x = function(model, x, sigmas[i:i + 2], extra_args=extra_args, callback=None, disable=True, **options)
            if on_step is not None:
                on_step(i + 1, _cpu({"x": x, "steps_total": total}))
        return x

    return sample


def _cpu(value: Any) -> Any:
    """``value`` with every tensor on the CPU and usable outside inference mode (a payload)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.is_inference():
            with torch.inference_mode(False):
                value = value.clone()
        return value
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cpu(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_cpu(item) for item in value)
    return value


# Diagnostics ---------------------------------------------------------------------------------------

def comfyui_report(settings: Settings) -> dict[str, Any]:
    """What ``run.py doctor`` shows for the ComfyUI engine; never raises for a broken setup.

    Keys: ``ok`` (importable and every model file found), ``summary`` (one line), ``path``,
    ``importable``, ``error`` (why not), ``version``, ``commit``, ``device``,
    ``free_memory_bytes``, and ``models``: for ``vae``, ``text_encoder``, ``diffusion_model`` and
    ``lora`` (the default job's) the configured ``name``, ComfyUI ``folder``, ``found``, ``path``
    (where it was found) and ``searched`` (the folders looked in).
    """
    path = settings.comfyui_path
    report: dict[str, Any] = {"ok": False, "summary": "", "path": str(path) if path is not None else None,
                              "importable": False, "error": None, "version": None, "commit": None,
                              "device": None, "free_memory_bytes": None, "models": {}}
    if path is not None and Path(path).is_dir():
        report["version"] = read_version(Path(path))
        report["commit"] = read_commit(Path(path))
    try:
        comfy = boot(settings)
    except PermanentError as exc:
        report["error"] = str(exc)
        report["summary"] = f"ComfyUI not usable: {exc}"
        return report
    report.update(importable=True, version=comfy.version, commit=comfy.commit)
    try:
        device = comfy.model_management.get_torch_device()
        report["device"] = comfy.model_management.get_torch_device_name(device)
        report["free_memory_bytes"] = int(comfy.model_management.get_free_memory(device))
    except Exception as exc:  # diagnostics must not fail on a driver problem
        report["device"] = f"unknown ({exc})"
    wanted = {"vae": ("vae", settings.vae_name), "text_encoder": ("text_encoder", settings.text_encoder_name),
              "diffusion_model": ("transformer", settings.diffusion_model_name)}
    if settings.defaults.lora:
        wanted["lora"] = ("lora", settings.defaults.lora)
    for label, (role, name) in wanted.items():
        folder = mapping.MODEL_FOLDERS[role]
        found = comfy.folder_paths.get_full_path(folder, name)
        report["models"][label] = {"name": name, "folder": folder, "found": found is not None, "path": found,
                                   "searched": comfy.folder_paths.get_folder_paths(folder)}
    missing = [f"{m['name']} (searched {', '.join(m['searched'])})" for m in report["models"].values() if not m["found"]]
    report["ok"] = not missing
    free = report["free_memory_bytes"]
    report["summary"] = (f"{comfy.describe()} at {comfy.path}, device {report['device']}"
                         + (f" ({free / 1e9:.1f} GB free)" if free is not None else "") + "; "
                         + (f"missing model files: {'; '.join(missing)}" if missing else "all model files found"))
    return report
