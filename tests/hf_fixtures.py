"""Tiny checkpoints in the published layouts of each family, made with `transformers`' own Llama /
Qwen2 / Qwen3 classes, and those classes run with the family's attention as the reference."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

REGULAR = 240  # plain word tokens w0..w239 at ids 0..239; special tokens follow
VOCAB = 256  # embedding rows (padded past the tokenizer, as the published vocabularies are)
DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@dataclass
class Case:
    family: str
    hf_class: str  # the transformers class that computes the layers
    specials: list[str]  # added tokens, ids REGULAR, REGULAR + 1, ...
    attention: str  # "bidirectional" | "block" | "causal": the reference's mask
    shift: bool  # position i's logits predict token i from position i-1
    hf_config: dict = field(default_factory=dict)  # the transformers class's config
    published: dict = field(default_factory=dict)  # the family's config.json keys
    block_size: int = 4
    rename: dict | None = None  # transformers name -> the family's (None: the same)
    chat_template: str | None = None

    def special_id(self, token: str) -> int:
        return REGULAR + self.specials.index(token)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
                 "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- endif %}")
LLADA_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                  "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
                  "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                  "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}")


def llada_names(n_layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight": "model.transformer.ln_f.weight",
             "lm_head.weight": "model.transformer.ff_out.weight"}
    for i in range(n_layers):
        a, b = f"model.layers.{i}.", f"model.transformer.blocks.{i}."
        names |= {a + "input_layernorm.weight": b + "attn_norm.weight", a + "self_attn.q_proj.weight": b + "q_proj.weight",
                  a + "self_attn.k_proj.weight": b + "k_proj.weight", a + "self_attn.v_proj.weight": b + "v_proj.weight",
                  a + "self_attn.o_proj.weight": b + "attn_out.weight", a + "post_attention_layernorm.weight": b + "ff_norm.weight",
                  a + "mlp.gate_proj.weight": b + "ff_proj.weight", a + "mlp.up_proj.weight": b + "up_proj.weight",
                  a + "mlp.down_proj.weight": b + "ff_out.weight"}
    return names


def cases() -> dict[str, Case]:
    llada_specials = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"]
    qwen2 = dict(DIMS, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    qwen3 = dict(DIMS, num_key_value_heads=2, head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    out = {
        "llada": Case("llada", "LlamaForCausalLM", llada_specials, "bidirectional", False,
                      hf_config=dict(DIMS, num_key_value_heads=4, rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False),
                      published={"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 64, "n_heads": 4,
                                 "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 96, "mlp_ratio": 4,
                                 "vocab_size": VOCAB, "embedding_size": VOCAB, "rope_theta": 500000.0,
                                 "rms_norm_eps": 1e-05, "activation_type": "silu", "block_type": "llama",
                                 "layer_norm_type": "rms", "rope": True, "alibi": False, "scale_logits": False,
                                 "input_emb_norm": False, "attention_layer_norm": False, "include_bias": False,
                                 "include_qkv_bias": False, "weight_tying": False, "block_group_size": 1,
                                 "max_sequence_length": 128, "mask_token_id": REGULAR + 2, "eos_token_id": REGULAR + 1,
                                 "pad_token_id": REGULAR + 1, "torch_dtype": "bfloat16"},
                      rename=llada_names(2), chat_template=LLADA_TEMPLATE),
        "dream": Case("dream", "Qwen2ForCausalLM", QWEN_SPECIALS + ["<|beginoftext|>", "<|mask|>"], "bidirectional", True,
                      hf_config=qwen2,
                      published={"architectures": ["DreamModel"], "model_type": "Dream", **qwen2, "vocab_size": VOCAB,
                                 "hidden_act": "silu", "max_position_embeddings": 128, "mask_token_id": REGULAR + 4,
                                 "pad_token_id": REGULAR, "bos_token_id": REGULAR, "eos_token_id": REGULAR},
                      chat_template=QWEN_TEMPLATE),
        "fast_dllm_v2": Case("fast_dllm_v2", "Qwen2ForCausalLM", QWEN_SPECIALS + ["|<MASK>|"], "block", True,
                             hf_config=qwen2,
                             published={"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen",
                                        **qwen2, "vocab_size": VOCAB, "bd_size": 4, "hidden_act": "silu",
                                        "max_position_embeddings": 128, "bos_token_id": REGULAR,
                                        "eos_token_id": REGULAR + 2, "pad_token_id": REGULAR + 2},
                             chat_template=QWEN_TEMPLATE),
        "sdar": Case("sdar", "Qwen3ForCausalLM", QWEN_SPECIALS + ["<|MASK|>"], "block", False, hf_config=qwen3,
                     published={"architectures": ["SDARForCausalLM"], "model_type": "sdar", **qwen3, "vocab_size": VOCAB,
                                "attention_bias": False, "block_size": 4, "mask_token_id": REGULAR + 3,
                                "hidden_act": "silu", "max_position_embeddings": 128, "bos_token_id": REGULAR,
                                "eos_token_id": REGULAR},
                     chat_template=QWEN_TEMPLATE),
        "llama": Case("llama", "LlamaForCausalLM", ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"],
                      "causal", True,
                      hf_config=dict(DIMS, num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-5,
                                     tie_word_embeddings=True,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
                      published={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
                                 **DIMS, "num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                                 "tie_word_embeddings": True, "max_position_embeddings": 128, "hidden_act": "silu",
                                 "attention_bias": False, "bos_token_id": REGULAR, "eos_token_id": REGULAR + 1,
                                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        "qwen2": Case("qwen2", "Qwen2ForCausalLM", QWEN_SPECIALS, "causal", True, hf_config=qwen2,
                      published={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **qwen2,
                                 "vocab_size": VOCAB, "hidden_act": "silu", "max_position_embeddings": 128,
                                 "bos_token_id": REGULAR, "eos_token_id": REGULAR}),
        "qwen3": Case("qwen3", "Qwen3ForCausalLM", QWEN_SPECIALS, "causal", True, hf_config=qwen3,
                      published={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **qwen3,
                                 "vocab_size": VOCAB, "attention_bias": False, "hidden_act": "silu",
                                 "max_position_embeddings": 128, "bos_token_id": REGULAR, "eos_token_id": REGULAR + 2}),
    }
    return out


def tiny_tokenizer(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(REGULAR)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def reference_model(case: Case, seed: int = 0):
    """The transformers model with random weights (norm scales and biases too, so that a dropped or
    misplaced one changes the logits)."""
    import transformers

    torch.manual_seed(seed)
    config_class = getattr(transformers, case.hf_class.replace("ForCausalLM", "Config"))
    model = getattr(transformers, case.hf_class)(config_class(vocab_size=VOCAB, max_position_embeddings=128,
                                                              attn_implementation="eager", **case.hf_config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def reference_logits(model, case: Case, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the transformers model under the family's attention, float32, aligned with ours:
    shifted families predict position i from position i-1 (the first position from itself)."""
    L = ids.shape[1]
    mask = None
    if case.attention != "causal":
        blocks = torch.arange(L) // case.block_size
        allowed = torch.ones(L, L, dtype=torch.bool) if case.attention == "bidirectional" else blocks[:, None] >= blocks[None, :]
        mask = torch.zeros(1, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if case.shift else logits


def write_checkpoint(case: Case, model, folder: Path, shards: int = 2) -> Path:
    """The model's weights under the family's names in `shards` safetensors files with an index,
    the family's config.json, tokenizer files and generation_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if case.hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    if case.rename:
        state = {case.rename[k]: v for k, v in state.items()}
    names = sorted(state)
    chunks = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in chunk}, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(case.published, indent=1))
    tiny_tokenizer(case.specials).save(str(folder / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": case.specials[1 if case.family in ("llada", "llama") else 0]}
    if case.family == "llada":
        tok_config |= {"bos_token": "<|startoftext|>", "pad_token": "<|endoftext|>"}
    if case.chat_template:
        tok_config["chat_template"] = case.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": case.published.get("eos_token_id")}))
    return folder
