"""A tiny random Qwen2.5-VL checkpoint directory (weights, config, tokenizer, chat template) built with
transformers + tokenizers, in the same files and layout as the real Cosmos-Reason1 / Qwen2.5-VL-7B directory."""

import json
import os

# The Qwen2-VL / Qwen2.5-VL chat template (tokenizer_config.json of Qwen/Qwen2.5-VL-7B-Instruct).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
TEXT = ("The video is captured from a camera mounted on a car. The camera is facing forward. A white truck passes "
        "a cyclist at a crossing while pedestrians wait under the trees; the road is wet and the sky is grey. "
        "You are a helpful assistant who will provide prompts to an image generator. system user assistant")


def build(model_dir: str, *, seed: int = 0, vocab: int = 320) -> dict:
    """Writes the directory; returns the text-config kwargs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    os.makedirs(model_dir, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    fast.save_pretrained(model_dir)
    assert len(fast) <= vocab
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=16, intermediate_size=32,
                                                                num_heads=2, out_hidden_size=64,
                                                                fullatt_block_indexes=[0]))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    model.save_pretrained(model_dir)
    return text


def to_flat_config(model_dir: str) -> None:
    """Rewrite config.json in the released (flat) layout: text fields at the top level, rope_theta/rope_scaling."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters", {})
    text.pop("model_type", None)
    cfg.update(text)
    cfg["rope_theta"] = rope.get("rope_theta", 1e6)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope.get("mrope_section", [2, 3, 3])}
    with open(path, "w") as f:
        json.dump(cfg, f)
