"""The name tables of the SimpleTuner import (tuner/interop/simpletuner.py): SimpleTuner's families, flavours,
optimisers, schedulers and quantisation levels as tuner names them, how secrets are recognised, and why the
keys tuner has no equivalent for are left out."""

from __future__ import annotations

import re

# SimpleTuner's model_family -> tuner's model group (flux, sd3, deepfloyd and legacy also pick a variant)
FAMILIES = {"sd1x": "sd15", "legacy": "sd15", "sd2x": "sd2", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
FAMILIES.update(pixart_sigma="pixart_sigma", kolors="kolors", deepfloyd="deepfloyd_if", chroma="chroma")
PRESETS = {
    "sd15": "sd15",
    "sd2": "sd2",
    "sdxl": "sdxl",
    "pixart_sigma": "pixart-sigma",
    "kolors": "kolors",
    "chroma": "chroma",
}
# the base model a SimpleTuner model_flavour stands for, when no pretrained_model_name_or_path is given
FLAVOURS = {("flux", "dev"): "black-forest-labs/FLUX.1-dev", ("flux", "schnell"): "black-forest-labs/FLUX.1-schnell"}
# SimpleTuner trains FLUX.1 Kontext as model_family flux, model_flavour kontext: tuner's flux_kontext family
FLAVOURS[("flux", "kontext")] = "black-forest-labs/FLUX.1-Kontext-dev"
FLAVOURS.update({("chroma", "hd"): "lodestones/Chroma1-HD", ("chroma", "base"): "lodestones/Chroma1-Base"})
FLAVOURS[("chroma", "flash")] = "lodestones/Chroma1-Flash"  # SimpleTuner's three Chroma flavours: base, hd, flash
FLAVOURS.update({("sd3", size): f"stabilityai/stable-diffusion-3.5-{size}" for size in ("medium", "large")})
# SimpleTuner's FLUX.2 flavours: dev, klein-4b, klein-9b (its default; the klein ones name the base checkpoints)
FAMILIES["flux2"], PRESETS["flux2"] = "flux2", "flux2-klein"
FLAVOURS.update({("flux2", "dev"): "black-forest-labs/FLUX.2-dev"})
FLAVOURS.update(
    {("flux2", f"klein-{size}"): f"black-forest-labs/FLUX.2-klein-base-{size.upper()}" for size in ("4b", "9b")}
)
FAMILIES["hidream"], PRESETS["hidream"] = "hidream", "hidream"  # SimpleTuner's flavours: full (its default), dev, fast
FLAVOURS.update({("hidream", f): f"HiDream-ai/HiDream-I1-{f.title()}" for f in ("full", "dev", "fast")})
# SimpleTuner's Z-Image flavours: turbo, turbo-ostris-v2 (Turbo with assistant LoRA v1 or v2: ASSISTANT), base;
# ostris-de-turbo swaps in another transformer. The base has its own preset (tuner/interop/simpletuner.py).
FAMILIES["z_image"], PRESETS["z_image"] = "z_image", "z-image"
FLAVOURS.update({("z_image", f): "Tongyi-MAI/Z-Image-Turbo" for f in ("turbo", "turbo-ostris-v2")})
FLAVOURS[("z_image", "base")] = "Tongyi-MAI/Z-Image"
# SimpleTuner's Qwen-Image flavours: v1.0, v2.0 (its default, also when none is given: Qwen-Image-2512, the same
# architecture); its edit-* flavours (or an Edit checkpoint's path) are tuner's qwen_image_edit family
FAMILIES["qwen_image"], PRESETS["qwen_image"] = "qwen_image", "qwen-image"
FLAVOURS.update({("qwen_image", "v1.0"): "Qwen/Qwen-Image", ("qwen_image", "v2.0"): "Qwen/Qwen-Image-2512"})
FLAVOURS[("qwen_image", "")] = "Qwen/Qwen-Image-2512"
# edit-v1 is Qwen-Image-Edit; edit-v2 and edit-v2+ are -2509 (v2+ also reads the inputs at timestep 0, which
# diffusers' transformer does where its config says zero_cond_t: -2511, SimpleTuner's edit-v3)
FLAVOURS.update({("qwen_image", "edit-v1"): "Qwen/Qwen-Image-Edit", ("qwen_image", "edit-v3"): "Qwen/Qwen-Image-Edit-2511"})
FLAVOURS.update({("qwen_image", f): "Qwen/Qwen-Image-Edit-2509" for f in ("edit-v2", "edit-v2+")})
# SimpleTuner's LTX-Video flavours: 0.9.5 (its default, also when none is given) and 0.9.0
FAMILIES["ltxvideo"], PRESETS["ltx_video"] = "ltx_video", "ltx-video"
FLAVOURS.update({("ltxvideo", "0.9.0"): "Lightricks/LTX-Video", ("ltxvideo", "0.9.5"): "Lightricks/LTX-Video-0.9.5"})
FLAVOURS[("ltxvideo", "")] = "Lightricks/LTX-Video-0.9.5"
# SimpleTuner's Wan flavours: t2v-480p-1.3b-2.1 (its default, also when none is given) and t2v-480p-14b-2.1
FAMILIES["wan"], PRESETS["wan"] = "wan", "wan21-1.3b"
FLAVOURS.update({("wan", "t2v-480p-1.3b-2.1"): "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", ("wan", "t2v-480p-14b-2.1"): "Wan-AI/Wan2.1-T2V-14B-Diffusers"})
FLAVOURS[("wan", "")] = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
# the other flavours SimpleTuner names for the families tuner trains (its models' HUGGINGFACE_PATHS)
FLAVOURS.update({("flux", "krea"): "black-forest-labs/FLUX.1-Krea-dev", ("kolors", "1.0"): "terminusresearch/kwai-kolors-1.0"})
FLAVOURS.update({("sdxl", f"base-{v}"): f"stabilityai/stable-diffusion-xl-base-{v}" for v in ("1.0", "0.9")})
FLAVOURS.update({("sd1x", "1.5"): "stable-diffusion-v1-5/stable-diffusion-v1-5", ("sd1x", "1.4"): "CompVis/stable-diffusion-v1-4"})
FLAVOURS.update({("sd1x", "dreamshaper"): "Lykon/dreamshaper-8", ("sd2x", "2.1"): "stabilityai/stable-diffusion-2-1"})
FLAVOURS.update({("sd2x", "2.0"): "stabilityai/stable-diffusion-2-0", ("sd2x", "pseudoflex-v2"): "bghira/pseudo-flex-v2"})
FLAVOURS.update({("sd2x", "pseudojourney"): "bghira/pseudo-journey-v2", ("sd2x", "digitaldiffusion"): "Junglerally/Digital-Diffusion"})
FLAVOURS.update({("pixart_sigma", f"900M-1024-v0.{v}"): f"terminusresearch/pixart-900m-1024-ft-v0.{v}" for v in ("6", "7-stage1", "7-stage2")})
FLAVOURS.update({("pixart_sigma", f"600M-{s}"): f"PixArt-alpha/PixArt-Sigma-XL-2-{s.replace('2048', '2K')}-MS" for s in ("512", "1024", "2048")})
FLAVOURS.update({("deepfloyd", f"i-{s}"): f"DeepFloyd/IF-I-{s[0].upper()}-v1.0" for s in ("medium-400m", "large-900m")})
FLAVOURS.update({("deepfloyd", "i-xlarge-4.3b"): "DeepFloyd/IF-I-XL-v1.0", ("deepfloyd", "ii-large-1.2b"): "DeepFloyd/IF-II-L-v1.0"})
FLAVOURS[("deepfloyd", "ii-medium-450m")] = "DeepFloyd/IF-II-M-v1.0"
FLAVOURS[("wan", "ti2v-5b-2.2")] = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"  # (Wan 2.2 T2V A14B: by its path, below)
# SimpleTuner's flavour when a config names neither a flavour nor a path (its models' DEFAULT_MODEL_FLAVOUR)
DEFAULT_FLAVOUR = {"flux": "krea", "sdxl": "base-1.0", "sd3": "medium", "sd1x": "dreamshaper", "sd2x": "pseudoflex-v2"}
DEFAULT_FLAVOUR.update(chroma="base", hidream="full", ltxvideo="0.9.5", qwen_image="v2.0", z_image="turbo-ostris-v2")
DEFAULT_FLAVOUR.update(flux2="klein-9b", wan="t2v-480p-1.3b-2.1", kolors="1.0", pixart_sigma="900M-1024-v0.6")
# flavours that train something else than tuner's family does: refused with the reason
_WAN_OTHER = "tuner trains Wan text-to-video (flavours t2v-480p-1.3b-2.1, t2v-480p-14b-2.1, ti2v-5b-2.2; the 2.2 " \
    "T2V A14B by its path)"
OTHER_FLAVOURS = {("wan", f): _WAN_OTHER for f in ("i2v-14b-2.1", "i2v-14b-2.1-720p", "i2v-14b-2.2-high")}
OTHER_FLAVOURS.update({("wan", f): _WAN_OTHER for f in ("i2v-14b-2.2-low", "flf2v-14b-2.1", "vace-1.3b-2.1", "vace-14b-2.1")})
OTHER_FLAVOURS.update({("wan", f): "AnimeGen swaps in its own expert checkpoints: " + _WAN_OTHER for f in ("animegen-t2v-high", "animegen-t2v-low")})
OTHER_FLAVOURS.update({("sdxl", f"refiner-{v}"): "tuner trains the SDXL base, not the refiner" for v in ("1.0", "0.9")})
OTHER_FLAVOURS[("sd1x", "realvis")] = "RealVisXL is an SDXL model: model_family=sdxl with its path"
OTHER_FLAVOURS[("flux", "libreflux")] = "LibreFlux trains with attention masking and real CFG, which tuner's flux does not"
OTHER_FLAVOURS[("flux", "fluxbooru")] = "Fluxbooru trains with real CFG, which tuner's flux does not"
OTHER_FLAVOURS[("z_image", "ostris-de-turbo")] = "it swaps in Ostris's de-distilled transformer, which tuner does not load"
# settings that change what is trained and that tuner cannot carry: refused, not dropped
REFUSED_KEYS = {
    "controlnet": "tuner trains no ControlNet",
    "control": "SimpleTuner's channel-wise control: for FLUX.1, start from tuner's flux-control preset instead",
}
_OPTIMIZERS = {  # tuner's optimizer group <- SimpleTuner's names for it (~: the same rule, another implementation)
    "adamw": "adamw adamw_bf16~ optimi-adamw~ bnb-adamw",
    "adamw8bit": "adamw8bit bnb-adamw8bit bnb-adamw8bit-paged~ ao-adamw8bit~",
    "lion": "lion optimi-lion~ bnb-lion",
    "lion8bit": "lion8bit bnb-lion8bit bnb-lion8bit-paged~",
    "stableadamw": "stableadamw optimi-stableadamw",
    "prodigy": "prodigy",
    "adafactor": "adafactor",
}
OPTIMIZERS = {name.rstrip("~"): group for group, names in _OPTIMIZERS.items() for name in names.split()}
NEAR_OPTIMIZERS = {name.rstrip("~") for names in _OPTIMIZERS.values() for name in names.split() if name.endswith("~")}
SCHEMAS = {"adamw": "AdamWConfig", "adamw8bit": "Adam8bitConfig", "lion": "LionConfig", "lion8bit": "LionConfig"}
SCHEMAS.update(stableadamw="StableAdamWConfig", prodigy="ProdigyConfig", adafactor="AdafactorConfig")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial", "linear", "sine")
LOGGERS = ("wandb", "tensorboard", "none")
NEAREST_LEVEL = {"int8-torchao": "int8-quanto", "fp8-torchao": "fp8-quanto", "fp8uz-quanto": "fp8-quanto"}

_SECRET_KEY = re.compile(r"(?:^|_)(token|secret|password|passwd|api_key|access_key|credentials?|webhook_url)(?:_|$)")
_SECRET_VALUE = re.compile(r"discord(?:app)?\.com/api/webhooks|hooks\.slack\.com", re.IGNORECASE)
# Why a key has no tuner equivalent, for keys SimpleTuner configs commonly carry: reason <- keys
_REASONS = {
    "the VAE loads from the base model's vae/ folder": "pretrained_vae_model_name_or_path vae_dtype",
    "tuner's LoRA starts as peft's gaussian initialisation": "lora_init_type",
    "model.noise_offset applies to every step": "noise_offset_probability",
    "validation renders one image per prompt": "num_validation_images",
    "SimpleTuner's built-in prompt library is not shipped: give prompts or a prompt_library": "validation_prompt_library",
    "validation samples as the family's pipeline does": "validation_guidance_rescale validation_guidance_real "
    "validation_noise_scheduler validation_torch_compile t5_padding",
    "logs go under output_dir": "logging_dir",
    "attention is PyTorch's scaled_dot_product_attention": "attention_mechanism enable_xformers_memory_efficient_attention",
    "optimizer.lr is used as given": "lr_scale lr_scale_sqrt",
    "tuner shifts as the checkpoint's scheduler does (Flux.1 dev: by image size, like auto-shift); model.flow_shift "
    "sets a fixed shift": "flow_schedule_auto_shift",
    "flow noise levels: model.timestep_sampling (logit_normal, mode, uniform)": "flow_use_beta_schedule",
    "used only with refiner_training": "refiner_training_strength refiner_training_invert_schedule",
    "used only with lora_type=lycoris": "lycoris_config",
    "SimpleTuner adds HiDream's load-balancing loss detached (no gradient changes); tuner's "
    "model.options.aux_loss_weight applies it": "hidream_use_load_balancing_loss hidream_load_balancing_loss_weight",
    "tuner never deletes data: unusable images are skipped and listed in dataset_report.json": "delete_unwanted_images "
    "delete_problematic_images",
    "tuner's caches are keyed on content and reused; a re-scan reads only changed files": "vae_cache_clear_each_epoch "
    "vae_cache_ondemand skip_file_discovery preserve_data_backend_cache",
    "tuner quantises where the model loads": "quantize_via",
    "bucket edges align to data.bucket_step": "aspect_bucket_rounding",
}
REASONS = {key: why for why, keys in _REASONS.items() for key in keys.split()}
GENERIC = "tuner has no equivalent setting"


def family_and_preset(st_family: str, path: str, flavour: str, model_type: str) -> tuple[str, str]:
    """SimpleTuner's model_family (with its path, flavour and model_type) -> tuner's family and preset."""
    text = f"{path} {flavour} {model_type}".lower()
    if st_family == "flux":
        if "kontext" in text:  # the edit model: its own family (reference tokens) and preset
            return "flux_kontext", "flux-kontext"
        return "flux", "flux-schnell" if "schnell" in text else "flux-dev"
    if st_family == "qwen_image" and "edit" in text:  # the edit models: their own family (the VL reads the input)
        return "qwen_image_edit", "qwen-image-edit"
    if st_family == "sd3":
        large = ("3.5" in path or "3_5" in path) if path else flavour.lower() in ("medium", "large")
        return "sd3", "sd35" if large else "sd3"
    if st_family == "deepfloyd":
        stage_2 = "if-ii" in text or "stage2" in text or flavour.lower().startswith("ii-")
        return ("deepfloyd_if_sr", "deepfloyd-if-sr") if stage_2 else ("deepfloyd_if", "deepfloyd-if")
    if st_family == "z_image":  # the base samples with CFG at many steps, Turbo without at 8: a preset each
        base = flavour.lower() == "base" or (bool(path) and "turbo" not in path.lower())
        return "z_image", "z-image-base" if base else "z-image"
    if st_family == "flux2":  # dev and klein sample differently (guidance embedding vs real CFG): a preset each
        return "flux2", "flux2-dev" if "dev" in text and "klein" not in text else "flux2-klein"
    if st_family == "wan":  # the 14B's preset quantises it and samples shorter clips; the 2.2 TI2V-5B has its own
        if "a14b" in text:  # Wan 2.2 T2V A14B: both experts (one with SimpleTuner's refiner keys)
            return "wan", "wan22-a14b"
        return "wan", "wan21-14b" if "14b" in text else "wan22-5b" if "5b" in text else "wan21-1.3b"
    family = "sd2" if st_family == "legacy" and "stable-diffusion-2" in text else FAMILIES[st_family]
    return family, PRESETS[family]


# SimpleTuner's default assistant LoRA per flavour (Ostris's de-distilling adapters: schnell's; Turbo's v1 or v2)
ASSISTANT = {
    ("flux", "schnell"): "ostris/FLUX.1-schnell-training-adapter",
    ("z_image", "turbo"): "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v1.safetensors",
    ("z_image", "turbo-ostris-v2"): "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors",
    ("z_image", ""): "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors",  # default
}


def assistant_adapter(st_family: str, flavour: str, path: str, weight: str) -> str | None:
    """The training adapter a SimpleTuner run trains with: its assistant_lora_path (+ weight name), else the
    flavour's default; None when it has none."""
    if path:
        return f"{path.rstrip('/')}/{weight}" if weight else path
    return ASSISTANT.get((st_family, flavour.lower()))
