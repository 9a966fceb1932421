"""The name tables of the SimpleTuner import (tuner/simpletuner.py): SimpleTuner's families, flavours,
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
# ostris-de-turbo swaps in another transformer. The base has its own preset (tuner/simpletuner.py).
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
    "tuner trains the denoiser only": "train_text_encoder",
    "tuner's LoRA is plain peft LoRA (no DoRA, default initialisation)": "use_dora lora_init_type",
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
