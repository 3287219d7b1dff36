"""Tiny random models of real decoder families, with tokenizers that have each family's traits.

    from architectures import ARCHS, build
    build("qwen3", tmp_path / "qwen3")   # -> a directory AutoModelForCausalLM / AutoTokenizer load

Every model is built here from its transformers config class (2 layers, 64 wide, random weights with a
wide init so that adapters visibly move the logits) and saved as safetensors; nothing is downloaded.
Every tokenizer is a byte-level BPE (vocab ~1024) trained on the shipped sample corpus, wrapped with the
family's special tokens (real added special tokens), its BOS behaviour and its chat template.

ARCHS holds, per architecture: the config class, the shape kwargs in that config's own names, whether
the embeddings are tied, and the tokenizer traits of the real family: chat template style (TEMPLATES),
BOS / EOS / pad tokens (pad None: the family ships without one), and whether the tokenizer adds BOS.
"""

from __future__ import annotations

from pathlib import Path

HIDDEN, LAYERS, FFN, POSITIONS, VOCAB = 64, 2, 128, 512, 1024
_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                   max_position_embeddings=POSITIONS)

# name: config class, shape kwargs (its own names), tied embeddings, chat style, bos, eos, pad, tokenizer adds BOS
ARCHS: dict[str, dict] = {
    "llama":    dict(config="LlamaConfig", shape=dict(**_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2),
                     tied=False, chat="llama3", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, add_bos=True),
    "qwen2":    dict(config="Qwen2Config", shape=dict(**_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2),
                     tied=True, chat="chatml", bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False),
    "qwen3":    dict(config="Qwen3Config", shape=dict(**_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2,
                                                      head_dim=16),
                     tied=True, chat="qwen3", bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False),
    "gemma2":   dict(config="Gemma2Config", shape=dict(**_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2,
                                                       head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
                     tied=True, chat="gemma", bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True),
    "gemma3":   dict(config="Gemma3TextConfig", shape=dict(**_LLAMA_LIKE, num_attention_heads=4,
                                                           num_key_value_heads=2, head_dim=16,
                                                           query_pre_attn_scalar=16, sliding_window=64),
                     tied=True, chat="gemma", bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True),
    "mistral":  dict(config="MistralConfig", shape=dict(**_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2),
                     tied=False, chat="none", bos="<s>", eos="</s>", pad=None, add_bos=True),
    "phi3":     dict(config="Phi3Config", shape=dict(**_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4,
                                                     original_max_position_embeddings=POSITIONS),
                     tied=False, chat="phi3", bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", add_bos=False),
    "gpt2":     dict(config="GPT2Config", shape=dict(n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=4,
                                                     n_positions=POSITIONS),
                     tied=True, chat="none", bos="<|endoftext|>", eos="<|endoftext|>", pad=None, add_bos=False),
    "gpt_neox": dict(config="GPTNeoXConfig", shape=dict(**_LLAMA_LIKE, num_attention_heads=4),
                     tied=False, chat="none", bos="<|endoftext|>", eos="<|endoftext|>", pad=None, add_bos=False),
    "opt":      dict(config="OPTConfig", shape=dict(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                                                    num_attention_heads=4, word_embed_proj_dim=HIDDEN,
                                                    max_position_embeddings=POSITIONS),
                     tied=True, chat="none", bos="</s>", eos="</s>", pad="<pad>", add_bos=True),
    "falcon":   dict(config="FalconConfig", shape=dict(hidden_size=HIDDEN, ffn_hidden_size=FFN,
                                                       num_hidden_layers=LAYERS, num_attention_heads=4,
                                                       multi_query=True, new_decoder_architecture=False,
                                                       parallel_attn=True, bias=False, alibi=False,
                                                       max_position_embeddings=POSITIONS),
                     tied=True, chat="none", bos="<|endoftext|>", eos="<|endoftext|>", pad=None, add_bos=False),
}

# Chat template styles: the template, the special tokens it uses, and what ends an assistant turn.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Qwen3's real template without tools: an assistant turn after the last user message renders its
# (here empty) reasoning block, an earlier one its content only (reasoning stripped).
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\n') %}"
    "{%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'"
    " + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
# style: (template, its special tokens, added tokens that are not special, end of an assistant turn)
TEMPLATES: dict[str, tuple[str | None, list[str], list[str], str | None]] = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], [], "<|im_end|>"),
    "qwen3": (QWEN3, ["<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], "<|im_end|>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"], [],
               "<|eot_id|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], [], "<end_of_turn>"),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], [], "<|end|>"),
    "none": (None, [], [], None),  # adapterkit's fallback template ends an assistant turn with EOS
}

# Extra special tokens the real families carry besides BOS/EOS/pad.
EXTRA = {"mistral": ["<unk>"], "opt": ["<unk>"], "gpt_neox": ["<|padding|>"]}


def corpus() -> list[str]:
    from adapterkit.data.loading import SAMPLES

    return (SAMPLES / "text" / "train.txt").read_text(encoding="utf-8").split("\n\n")


def special_tokens(name: str) -> list[str]:
    a = ARCHS[name]
    _, template_tokens, _, _ = TEMPLATES[a["chat"]]
    tokens = [t for t in (a["eos"], a["pad"], a["bos"]) if t] + EXTRA.get(name, []) + template_tokens
    return list(dict.fromkeys(tokens))


def build_tokenizer(name: str):
    """A byte-level BPE trained on the sample corpus, with the family's special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    a = ARCHS[name]
    template, _, plain_added, _ = TEMPLATES[a["chat"]]
    specials = special_tokens(name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if plain_added:  # Qwen3's <think> tags: added tokens, not special (as in the real tokenizer)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    named = {k: v for k, v in (("bos_token", a["bos"]), ("eos_token", a["eos"]), ("pad_token", a["pad"])) if v}
    others = [t for t in specials if t not in named.values()]
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **named, extra_special_tokens=others,
                                      add_bos_token=a["add_bos"], add_eos_token=False,
                                      model_max_length=1_000_000)
    wrapped.chat_template = template
    return wrapped


def build_config(name: str, tok):
    import transformers

    a = ARCHS[name]
    cls = getattr(transformers, a["config"])
    init = {"init_std": 0.3} if a["config"] == "OPTConfig" else {"initializer_range": 0.3}
    return cls(**a["shape"], **init, vocab_size=len(tok), tie_word_embeddings=a["tied"],
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build(name: str, out_dir: Path) -> Path:
    """Build architecture `name` (random weights, seed 0) and save model (safetensors) and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    out_dir = Path(out_dir)
    tok = build_tokenizer(name)
    config = build_config(name, tok)
    set_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
