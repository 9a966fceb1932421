"""The whole lifecycle in one real run: EMA, validation, webhook, Hub upload and model card, with the
Discord-like and Hub-like servers on 127.0.0.1 from the webhook and hub tests."""

import json

import yaml
from test_hub import FAKE_TOKEN, hub  # noqa: F401 - the fixture is used by name
from test_webhook import TOKEN, discord  # noqa: F401

from tuner.run import train


def test_full_lifecycle_run_publishes_and_leaks_no_secret(make_cfg, discord, hub, tmp_path):  # noqa: F811
    hook = tmp_path / "webhook.json"
    hook.write_text(json.dumps({"webhook_url": discord.url, "webhook_type": "discord", "message_prefix": "ci"}))
    out = tmp_path / "out"
    cfg = make_cfg(
        "max_train_steps=4",
        "checkpointing_steps=2",
        "data.crop_style=center",
        "data.instance_prompt=sks",
        "callbacks.ema.enabled=true",
        "callbacks.validation.enabled=true",
        "callbacks.validation.every_n_steps=2",
        "callbacks.validation.prompts=[sks red circle]",
        "callbacks.validation.num_inference_steps=2",
        "callbacks.validation.resolution=64",
        f"callbacks.webhook.config={hook}",
        "callbacks.webhook.status_every_n_steps=2",
        "callbacks.hub.push_to_hub=true",
        "callbacks.hub.model_name=my-lora",
        f"callbacks.hub.endpoint={hub.url}",
        output_dir=out,
    )
    train(cfg)

    # Discord: a summary, status lines, the validation images as attachments, then "complete".
    discord.wait_for(5)
    text = " ".join(str(b.get("content", "")) for b in discord.json_bodies())
    assert "ci" in text and "complete" in text.lower()
    assert any(b"filename=" in r["body"] and b"\x89PNG" in r["body"] for r in discord.requests)

    # The Hub: the final commit carries the model card and both weight files.
    final = hub.commits()[-1]
    assert {"README.md", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"} <= set(final)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["instance_prompt"] == "sks" and "lora" in front["tags"]
    assert "10%" in card  # caption dropout 0.1

    # Secrets: neither the webhook URL's token nor the Hub token is anywhere under output_dir.
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and FAKE_TOKEN.encode() not in data, path
