"""Toy models built from ComfyUI's own classes, small enough to train and sample on a CPU.

A tiny FLUX (or Qwen-Image) diffusion model from ``comfy.supported_models``, a toy text encoder
wrapped in ``comfy.sd.CLIP`` and a parameter-free toy VAE that is a ``comfy.sd.VAE``. The stock
CLIPTextEncode, EmptyLatentImage, KSampler, VAEEncode and VAEDecode nodes accept them exactly as
they accept FLUX.1-dev; only the sizes differ.

Geometry matches the real models: a 256x256 image (the toy world's size) becomes a 32x32 latent (8x
pool) with 16 channels, which the 2x2 patchify turns into 16x16 = 256 image tokens; 128 px gives 8x8.
"""

import json
import os
import re
import zlib

import safetensors
import torch

from ..core import host

TEXT_WIDTH = 64  # width of the toy text embeddings (FLUX context_in_dim / Qwen joint_attention_dim)
VOCAB_SIZE = 256
POSITIONS = 256  # rows of the position table; longer (padded) prompts wrap around
MAX_TOKENS = 1024  # enough for FLUX's 512-token entity padding
LATENT_CHANNELS = 16
POOL = 8  # VAE downscale factor, as in the real FLUX / Qwen-Image VAEs

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

# Words the toy world uses get fixed ids; any other word is hashed into the spare ids after them.
PAD, END, START = "<pad>", "<end>", "<start>"
WORDS = [
    PAD, END, START, "a", "an", "the", "and", "on", "with", "of", "in", "background", "plain",
    "red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple", "white", "black",
    "grey", "gray", "dark", "light", "brown", "pink",
    "circle", "square", "triangle", "diamond", "cross", "ring", "star", "shape",
    "left", "right", "top", "bottom", "small", "big", "large",
]
WORD_IDS = {word: index for index, word in enumerate(WORDS)}


# ---------------------------------------------------------------------------------------------
# Diffusion models: one spec per family (the model config and the layers that start at zero when
# pretraining, the "adaLN-zero" recipe that keeps a fresh DiT stable).

FAMILIES = {
    "flux": {
        "model_class": "Flux",  # a comfy.supported_models config (host.models.supported_model_config)
        "unet_config": {
            "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
            "vec_in_dim": TEXT_WIDTH, "context_in_dim": TEXT_WIDTH, "hidden_size": 128,
            "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
            "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2, "qkv_bias": True,
            "guidance_embed": False,
        },
        "zero_init": r"(^|\.)(img_mod|txt_mod|modulation)\.lin\.|^final_layer\.",
        "weights_file": "toy_flux_base.safetensors",
    },
    "qwen_image": {
        "model_class": "QwenImage",
        "unet_config": {
            "image_model": "qwen_image", "patch_size": 2, "in_channels": 4 * LATENT_CHANNELS,
            "out_channels": LATENT_CHANNELS, "num_layers": 3, "attention_head_dim": 64,
            "num_attention_heads": 2, "joint_attention_dim": TEXT_WIDTH,
            "axes_dims_rope": [16, 24, 24],
        },
        "zero_init": r"(^|\.)(img_mod|txt_mod)\.1\.|^norm_out\.linear\.|^proj_out\.",
        "weights_file": "toy_qwen_image_base.safetensors",
    },
}


def family_spec(family):
    if family not in FAMILIES:
        raise ValueError(f"toy family {family!r} is unknown; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def init_weights(module, seed, zero_init_pattern=None):
    """Deterministic init for comfy.ops layers (which skip their own init and hold torch.empty).

    Matrices: Xavier uniform; biases: 0; norm scales: 1. Parameters whose name matches
    `zero_init_pattern` start at zero (used for pretraining). Without it every layer is non-zero, so
    tests see every parameter affect the output.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if zero_init_pattern and re.search(zero_init_pattern, name):
                value = torch.zeros(param.shape)
            elif param.ndim >= 2:
                fan_out, fan_in = param.shape[0], param[0].numel()
                bound = (6.0 / (fan_in + fan_out)) ** 0.5
                value = torch.rand(param.shape, generator=generator) * (2 * bound) - bound
            elif name.endswith("bias"):
                value = torch.zeros(param.shape)
            else:
                value = torch.ones(param.shape)
            param.copy_(value.to(param.dtype))


def build_diffusion_model(family="flux", dtype=torch.float32):
    """A `comfy.model_base.BaseModel` of the tiny family with uninitialised weights."""
    spec = family_spec(family)
    config = host.models.supported_model_config(spec["model_class"])(dict(spec["unet_config"]))
    config.set_inference_dtype(dtype, None)
    return config.get_model({})


# ---------------------------------------------------------------------------------------------
# Toy text encoder.

def word_id(word):
    """Fixed id for toy-world words; any other word hashes (stably, crc32) into the spare ids."""
    if word in WORD_IDS:
        return WORD_IDS[word]
    spare = VOCAB_SIZE - len(WORDS)
    return len(WORDS) + zlib.crc32(word.encode("utf-8")) % spare


class ToyTokenizer:
    """Lower-cased words -> ids, an end token, optional padding; ComfyUI's (text:weight) syntax works.

    Padding: the tokenizer option `min_length` (or any `<name>_min_length`, e.g. `t5xxl_min_length`
    as for FLUX's T5) pads with <pad> tokens up to that length.
    """

    embedding_key = "toy"

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.min_length = tokenizer_data.get("min_length")

    def _min_length(self, tokenizer_options):
        lengths = [v for k, v in tokenizer_options.items() if k == "min_length" or k.endswith("_min_length")]
        lengths = [int(v) for v in lengths if v is not None]
        if self.min_length is not None:
            lengths.append(int(self.min_length))
        return max(lengths, default=0)

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        tokens = []
        word_index = 0
        for segment, weight in host.encoders.prompt_weight_segments(text):
            for word in re.findall(r"[a-z]+|[0-9]+", segment.lower()):
                word_index += 1
                tokens.append((word_id(word), weight, word_index))
        tokens.append((WORD_IDS[END], 1.0, 0))
        min_length = self._min_length(tokenizer_options)
        tokens += [(WORD_IDS[PAD], 1.0, 0)] * max(0, min_length - len(tokens))
        if len(tokens) > MAX_TOKENS:
            raise ValueError(
                f"prompt {text[:60]!r} has {len(tokens)} tokens; the toy text encoder takes at most {MAX_TOKENS}"
            )
        if not return_word_ids:
            tokens = [(token, weight) for token, weight, _ in tokens]
        return {self.embedding_key: [tokens]}

    def untokenize(self, token_weight_pair):
        return [(pair, WORDS[pair[0]] if pair[0] < len(WORDS) else f"<{pair[0]}>") for pair in token_weight_pair]

    def state_dict(self):
        return {}


class ToyTextEncoder(torch.nn.Module):
    """Frozen word table + position table + a fixed projection of the previous word.

    The previous-word term gives word order a meaning ("red circle and blue square" differs from
    "blue circle and red square"). Pooled output: the mean of the word vectors (a bag of words).
    """

    def __init__(self, seed=0, dtype=None, device=None, model_options={}):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.word_table = torch.nn.Parameter(torch.randn(VOCAB_SIZE, TEXT_WIDTH, generator=generator), requires_grad=False)
        self.position_table = torch.nn.Parameter(
            0.5 * torch.randn(POSITIONS, TEXT_WIDTH, generator=generator), requires_grad=False)
        self.previous_word = torch.nn.Parameter(
            0.5 * torch.randn(TEXT_WIDTH, TEXT_WIDTH, generator=generator) / TEXT_WIDTH ** 0.5, requires_grad=False)
        self.dtypes = {torch.float32}  # tiny: always computes in float32, whatever ComfyUI suggests
        if device is not None:
            self.to(device)

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_ids(self, ids, weights):
        """ids, weights [L] -> (embeddings [1, L, D], pooled [1, D])."""
        words = self.word_table[ids]
        previous = self.word_table[torch.cat([ids.new_tensor([WORD_IDS[START]]), ids[:-1]])]
        positions = torch.arange(len(ids), device=ids.device) % POSITIONS
        embeds = words + self.position_table[positions] + previous @ self.previous_word
        embeds = embeds * weights[:, None].to(embeds.dtype)
        real = ids != WORD_IDS[PAD]
        pooled = words[real].mean(dim=0) if real.any() else torch.zeros_like(words[0])
        return embeds[None], pooled[None]

    def encode_token_weights(self, token_weight_pairs):
        sequences = token_weight_pairs[ToyTokenizer.embedding_key]
        device = self.word_table.device
        outputs = []
        for sequence in sequences:
            ids = torch.tensor([int(pair[0]) for pair in sequence], dtype=torch.long, device=device)
            weights = torch.tensor([float(pair[1]) for pair in sequence], device=device)
            outputs.append(self.encode_ids(ids, weights))
        cond = torch.cat([embeds for embeds, _ in outputs], dim=1)
        pooled = outputs[0][1]
        return cond.to(host.memory.intermediate_device()), pooled.to(host.memory.intermediate_device())

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)


def build_clip(seed=0, text_encoder_sd=None):
    """A stock `comfy.sd.CLIP` around the toy tokenizer and encoder."""
    clip = host.encoders.build_clip(ToyTokenizer, ToyTextEncoder, {"seed": seed})
    if text_encoder_sd is not None:
        missing, unexpected = host.encoders.text_encoder_module(clip).load_state_dict(text_encoder_sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"toy text encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    return clip


# ---------------------------------------------------------------------------------------------
# Toy VAE.

class ToyPoolAutoencoder(torch.nn.Module):
    """Parameter-free: 8x average pool to RGB, stored so the model sees RGB in [-1, 1] after the
    family's latent_format.process_in, the other 13 channels at 0; decode = nearest upsample."""

    def __init__(self, latent_format, pool=POOL):
        super().__init__()
        self.pool = pool
        # Invert the family's latent normalisation so process_in(encode(x)) == pooled pixels.
        probe = torch.zeros(1, LATENT_CHANNELS, 1, 1)
        if getattr(latent_format, "latent_dimensions", 2) == 3:
            probe = probe[:, :, None]
        zero_point = latent_format.process_out(probe).flatten()
        unit = latent_format.process_out(probe + 1).flatten() - zero_point
        self.register_buffer("zero_point", zero_point.float(), persistent=False)
        self.register_buffer("unit", unit.float(), persistent=False)

    def _channels(self, like):
        shape = [1, LATENT_CHANNELS] + [1] * (like.ndim - 2)
        return self.zero_point.view(shape).to(like), self.unit.view(shape).to(like)

    def encode(self, pixels):
        frames = pixels.shape[2] if pixels.ndim == 5 else None
        flat = pixels.transpose(1, 2).flatten(0, 1) if frames else pixels
        pooled = torch.nn.functional.avg_pool2d(flat, self.pool)
        padded = torch.nn.functional.pad(pooled, (0, 0, 0, 0, 0, LATENT_CHANNELS - pooled.shape[1]))
        if frames:
            padded = padded.unflatten(0, (pixels.shape[0], frames)).transpose(1, 2)
        zero_point, unit = self._channels(padded)
        return padded * unit + zero_point

    def decode(self, latent, **kwargs):
        zero_point, unit = self._channels(latent)
        rgb = ((latent - zero_point) / unit)[:, :3]
        frames = rgb.shape[2] if rgb.ndim == 5 else None
        flat = rgb.transpose(1, 2).flatten(0, 1) if frames else rgb
        image = torch.nn.functional.interpolate(flat, scale_factor=self.pool, mode="nearest")
        if frames:
            image = image.unflatten(0, (rgb.shape[0], frames)).transpose(1, 2)
        return image


class ToyVAE(host.encoders.vae_class()):
    """A comfy.sd.VAE (built through its own constructor) whose first stage is the pool autoencoder."""

    def __init__(self, family="flux", pool=POOL):
        # The pixel-space entry point sets device, dtype, output device and patcher the stock way.
        host.encoders.init_pixel_space_vae(self, dtype=torch.float32)
        latent_format = host.models.supported_model_config(family_spec(family)["model_class"]).latent_format()
        host.encoders.install_vae_first_stage(self, ToyPoolAutoencoder(latent_format, pool).eval(), pool, LATENT_CHANNELS,
                                     latent_format.latent_dimensions)


# ---------------------------------------------------------------------------------------------
# Loading.

def weights_path(family="flux"):
    return os.path.join(WEIGHTS_DIR, family_spec(family)["weights_file"])


def read_weights(path):
    """(diffusion state dict, text encoder state dict, metadata) from a toy weights file."""
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    model_sd = {k[len("diffusion_model."):]: v for k, v in tensors.items() if k.startswith("diffusion_model.")}
    text_sd = {k[len("text_encoder."):]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    return model_sd, text_sd, metadata


def wrap_model(base_model):
    return host.memory.wrap_in_patcher(base_model, "unet")


def load_toy_models(family="flux", weights="pretrained", seed=0, dtype=torch.float32, weights_file=None, pool=POOL):
    """(ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE) of the toy world.

    weights="pretrained" loads toyworld/weights/<family file> (or `weights_file`): diffusion model and
    text encoder; weights="random" initialises both deterministically from `seed` (every layer non-zero).
    `pool`: the toy VAE's downscale factor (8, as FLUX's VAE; 4 gives a 128 px image 16x16 tokens).
    """
    base_model = build_diffusion_model(family, dtype)
    if weights == "random":
        init_weights(base_model.diffusion_model, seed)
        clip = build_clip(seed)
    elif weights == "pretrained":
        path = weights_file or weights_path(family)
        if not os.path.exists(path):
            raise ValueError(
                f"toy {family} weights {os.path.basename(path)} are missing; "
                f"build them with `scripts/toyworld.py build-weights --family {family}` or use weights='random'")
        model_sd, text_sd, metadata = read_weights(path)
        missing, unexpected = base_model.diffusion_model.load_state_dict(model_sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{os.path.basename(path)} does not fit the toy {family} model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}")
        clip = build_clip(int(json.loads(metadata.get("toy_world", "{}")).get("text_seed", 0)), text_sd)
    else:
        raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}")
    return wrap_model(base_model), clip, ToyVAE(family, pool)
