"""A tiny random-weight Qwen-Image-Edit-2509 model in diffusers format, built offline.

It has the real architecture (QwenImageTransformer2DModel, AutoencoderKLQwenImage,
Qwen2.5-VL with a vision tower, a byte-level BPE tokenizer with Qwen's special tokens,
Qwen2VLProcessor, the real scheduler config) at toy sizes, so that the whole pipeline runs in
well under a second a job on a laptop CPU. Its outputs are noise: it exists for CI, tests and
trying the daemon without downloading 40 GB.

``build_tiny_model(folder, seed)`` is deterministic for a given seed and library versions. It
writes into a temporary sibling folder and renames it into place, so a half-built model is
never seen under ``folder``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

LORA_NAME = "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"
# VAE tiles of 32 pixels (stride 24) so that tiling profiles really tile the tests' 64x64 images.
ENGINE_HINTS = {"vae_image_area": 64 * 64, "condition_image_area": 32 * 32, "vae_tile_size": 32, "vae_tile_stride": 24}

# Qwen2.5-VL's special tokens, in the order of their real ids (151643...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The scheduler config of Qwen/Qwen-Image(-Edit-2509) (scheduler/scheduler_config.json).
QWEN_IMAGE_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Tiny sizes. The transformer's joint_attention_dim must equal the text model's hidden size;
# in_channels 64 = z_dim 16 x 2x2 patches; the VAE keeps z_dim 16 and three down-sampling
# stages so that vae_scale_factor stays 8 as in the real model.
TEXT_HIDDEN = 32
VISION_PATCH = 8   # condition images are resized to multiples of VISION_PATCH * 2 (merge size)

TRAINING_TEXT = """\
Describe the key features of the input image (color, shape, size, texture, objects, background),
then explain how the user's text instruction should alter or modify the image. Generate a new image
that meets the user's requirements while maintaining consistency with the original input where
appropriate. Picture 1: Picture 2: Picture 3: system user assistant
Make the sky blue. Remove the person on the left. Turn the cat into a tiger, photorealistic.
Replace the text on the sign with 'hello world'. Change the season to winter with snow on the trees.
Add a red hat to the dog. The quick brown fox jumps over the lazy dog. 0123456789
blurry, low quality, distorted, watermark, extra fingers, bad anatomy, jpeg artifacts.
Ein Hund mit rotem Hut. Un chat sur le toit. Cambia el fondo a una playa al atardecer.
"""

README = """\
This is a TINY RANDOM-WEIGHT model built by qie-hotfolder (stages/tiny_model.py).
It has the architecture of Qwen-Image-Edit-2509 at toy sizes and random weights:
its outputs are noise. It exists for tests, CI and trying the daemon without the real model.
Set `model_path` to a diffusers-format Qwen-Image-Edit-2509 folder for real edits.
"""


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Build the tiny model into ``folder`` (replacing nothing that exists); return ``folder``."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _build_into(tmp, seed)
        _make_readable(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if (folder / "model_index.json").is_file():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return folder
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _make_readable(root: Path) -> None:
    """mkdtemp and some savers create owner-only entries; give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _build_into(root: Path, seed: int) -> None:
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImageTransformer2DModel)
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor)

    tokenizer = _train_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)

    # Text encoder: Qwen2.5-VL with a two-layer language model and a two-block vision tower.
    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": TEXT_HIDDEN // head_dim,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": VISION_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": VISION_PATCH * 2 * 2,
            "out_hidden_size": TEXT_HIDDEN,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    _randomise(text_encoder, seed + 1)
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(root / "tokenizer")

    # Processor: small images for the vision tower.
    image_processor = Qwen2VLImageProcessor(
        patch_size=VISION_PATCH, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": (VISION_PATCH * 2) ** 2, "longest_edge": 64 * 64},
    )
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=_video_processor())
    processor.save_pretrained(root / "processor")

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    _randomise(transformer, seed + 2)
    transformer.save_pretrained(root / "transformer", safe_serialization=True)

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 attn_scales=[], temperal_downsample=[False, True, True])
    _randomise(vae, seed + 3)
    vae.save_pretrained(root / "vae", safe_serialization=True)

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in QWEN_IMAGE_SCHEDULER.items() if not k.startswith("_")})
    scheduler.save_pretrained(root / "scheduler")

    model_index = {
        "_class_name": "QwenImageEditPlusPipeline",
        "_diffusers_version": _diffusers_version(),
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    (root / "qie_engine.json").write_text(json.dumps(ENGINE_HINTS, indent=2) + "\n")
    (root / "TINY_MODEL_README.txt").write_text(README)
    _write_lora(root / "loras" / LORA_NAME, transformer, seed + 4)


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__


def _video_processor():
    """Qwen2VLProcessor wants a video processor; give it a small one when available."""
    try:
        from transformers import Qwen2VLVideoProcessor
    except ImportError:
        return None
    return Qwen2VLVideoProcessor(patch_size=VISION_PATCH, merge_size=2, temporal_patch_size=2,
                                 size={"shortest_edge": (VISION_PATCH * 2) ** 2,
                                       "longest_edge": 64 * 64})


def _train_tokenizer():
    """A byte-level BPE trained on built-in text, with Qwen's pre-tokenizer and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=1, show_progress=False,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL_TOKENS if t != "<|endoftext|>"], special_tokens=True)
    return tokenizer


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that do not depend on the library's init code: N(0, 1/fan_in) matrices,
    norm scales near 1, small biases. Parameters are visited in name order."""
    generator = torch.Generator("cpu").manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not param.dtype.is_floating_point:
            continue
        shape = param.shape
        if param.ndim >= 2:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        elif name.endswith("bias"):
            value = torch.randn(shape, generator=generator) * 0.02
        else:  # norm scales (RMSNorm gammas) and other vectors
            value = 1.0 + torch.randn(shape, generator=generator) * 0.1
        param.copy_(value.to(param.dtype))


@torch.no_grad()
def _write_lora(path: Path, transformer: torch.nn.Module, seed: int) -> None:
    """A rank-4 LoRA for every attention projection of every block, keyed like the real
    Lightning files (``transformer_blocks.N.attn.to_q.lora_A.weight``, no ``transformer.`` prefix)."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(seed)
    rank = 4
    tensors = {}
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    for name, module in sorted(transformer.named_modules(), key=lambda item: item[0]):
        if not isinstance(module, torch.nn.Linear) or not name.startswith("transformer_blocks."):
            continue
        if not any(name.endswith(".attn." + t) for t in targets):
            continue
        a = torch.randn(rank, module.in_features, generator=generator) / math.sqrt(module.in_features)
        b = torch.randn(module.out_features, rank, generator=generator) * 0.2
        tensors[f"{name}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_gguf(model: Path, path: Path, quant: str = "Q8_0", prefix: str = "") -> Path:
    """The diffusion model of the diffusers-format ``model`` folder as a GGUF file (the ``gguf``
    package's writer), its matrices quantized as ``quant`` (Q8_0, Q4_0, ... whatever the package
    can quantize) where their rows fit the quantization's blocks, the rest as float32; keys get
    ``prefix`` (ComfyUI's files use ``model.diffusion_model.``)."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    qtype = gguf.GGMLQuantizationType[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="qwen_image")
    for file in sorted((model / "transformer").glob("*.safetensors")):
        for name, tensor in sorted(load_file(str(file)).items()):
            array = tensor.float().numpy()
            if array.ndim == 2 and array.shape[-1] % block == 0:
                data = gguf.quants.quantize(array, qtype)
                writer.add_tensor(prefix + name, data, raw_shape=data.shape, raw_dtype=qtype)
            else:
                writer.add_tensor(prefix + name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
