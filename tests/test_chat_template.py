import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer

from pllm.actors.openai_protocol import APIError, ChatMessage, chat_prompt, chat_prompt_for
from pllm.chat_template import render_chat
from pllm.tokenizer import (SPECIAL_TOKENS, Tokenizer, read_tokenizer_config, template_token_strings,
                            token_string)

# Published templates, verbatim (LLaDA-8B-Instruct; Qwen2.5-Instruct).
LLADA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
         "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
         "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
         "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Zephyr's template with its block tags indented: whitespace around tags depends on trim_blocks/lstrip_blocks.
ZEPHYR = """{% for message in messages %}
  {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
  {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
  {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
  {% endif %}
  {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
  {% endif %}
{% endfor %}"""
# Roles must alternate (the Mistral/Llama-2 style check) and the content goes through tojson.
STRICT = ("{{ bos_token }}{% for message in messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{{ '[' + message['role'] + '] ' + message['content'] | tojson }}\n"
          "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")

ADDED = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|mdm_mask|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["[UNK]", "you", "are", "a", "helpful", "assistant", "hi", "hello", "2", "+", "=", "?", "4", "what", "is",
         "system", "user", "<", ">", "&", "é"]
CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3 + 3 <b>&'é\"?"}],
    [{"role": "user", "content": "  \n padded content\t \n"}],
]
LLADA_IDS = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 1, "mask_token_id": 5}


def _hf_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(ADDED + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(ADDED)  # already in the vocabulary: they keep ids 0..7
    return tok


def _folder(tmp_path, name: str, template: str, **tokens) -> tuple:
    folder = tmp_path / name
    folder.mkdir()
    _hf_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, AutoTokenizer.from_pretrained(str(folder))


def _ours(folder, ids: dict = LLADA_IDS) -> Tokenizer:
    config = read_tokenizer_config(folder)
    return Tokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")), special_token_ids=ids,
                     chat_template=config["chat_template"], token_strings=template_token_strings(config))


@pytest.mark.parametrize("template,tokens", [
    (LLADA, {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}),
    (QWEN, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}),
    (ZEPHYR, {"eos_token": "<|endoftext|>"}),
    (STRICT, {"bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "special": True},
                "eos_token": "<|endoftext|>"}),
])
def test_render_matches_transformers(tmp_path, template, tokens):
    folder, hf = _folder(tmp_path, "ckpt", template, **tokens)
    ours = _ours(folder)
    chats = CHATS if template != STRICT else [CHATS[1], CHATS[2]]
    for chat in chats:
        for gen in (True, False):
            expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected
        ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ours.apply_chat_template(chat, tokenize=True) == list(ids)
    if template == LLADA:  # bos only before the first turn, content trimmed
        text = ours.apply_chat_template(CHATS[2])
        assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\npadded content<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if template == ZEPHYR:
        assert ours.apply_chat_template(CHATS[2]) == "<|user|>\n  \n padded content\t \n<|endoftext|>\n<|assistant|>\n"
    if template == QWEN:  # the default system prompt when the chat has none
        assert ours.apply_chat_template(CHATS[2]).startswith("<|im_start|>system\nYou are Qwen")
        assert "bos_token" not in ours.token_strings


def test_tojson_with_tools_matches_transformers(tmp_path):
    folder, hf = _folder(tmp_path, "qwen", QWEN, eos_token="<|im_end|>")
    tools = [{"type": "function", "function": {"name": "add", "description": "x < y & 'z' é",
                                               "parameters": {"type": "object", "properties": {}}}}]
    chat = CHATS[1] + [{"role": "assistant", "content": None,
                        "tool_calls": [{"function": {"name": "add", "arguments": {"a": "<1>"}}}]}]
    expected = hf.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
    got = _ours(folder).apply_chat_template(chat, tools=tools)
    assert got == expected and '"x < y & \'z\' é"' in got and '{"a": "<1>"}' in got


def test_raise_exception_becomes_value_error(tmp_path):
    folder, hf = _folder(tmp_path, "strict", STRICT, bos_token="<|startoftext|>")
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]
    with pytest.raises(Exception, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="^chat template: Conversation roles must alternate"):
        _ours(folder).apply_chat_template(bad)
    with pytest.raises(ValueError, match="^chat template: "):
        render_chat("{% for %}", [])  # a syntax error
    with pytest.raises(ValueError, match="has none"):
        Tokenizer(_hf_tokenizer(), special_token_ids=LLADA_IDS).apply_chat_template(bad)


def test_sandbox_blocks_internals():
    with pytest.raises(ValueError, match="chat template"):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="chat template"):
        render_chat("{% set ns = namespace(_x=1) %}", [])
    assert render_chat("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                       "{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}", [{"role": "user"}] * 3) == '3{"a": 1}'


def test_config_reading(tmp_path):
    assert read_tokenizer_config(tmp_path) == {}
    assert token_string({"a": {"content": "<x>", "lstrip": False}, "b": "<y>", "c": None}, "a") == "<x>"
    assert token_string({"b": "<y>"}, "b") == "<y>" and token_string({"c": None}, "c") is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        "bos_token": "<s>", "add_bos_token": True}))
    assert read_tokenizer_config(tmp_path)["chat_template"] == "D"
    assert template_token_strings(read_tokenizer_config(tmp_path)) == {"bos_token": "<s>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    (tmp_path / "chat_template.jinja").write_text("J")  # the separate file wins, as in transformers
    config = read_tokenizer_config(tmp_path)
    assert config["chat_template"] == "J" and token_string(config, "eos_token") == "</s>"


def test_special_ids_round_trip(tmp_path):
    tok = Tokenizer(_hf_tokenizer(), special_token_ids=LLADA_IDS, chat_template=LLADA,
                    token_strings={"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"})
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (1, 0, 1, 5)
    with pytest.raises(AttributeError):
        tok.chat_template = "x"
    tok.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["pllm_special_token_ids"] == LLADA_IDS and config["chat_template"] == LLADA
    assert config["mask_token"] is None and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = tok.apply_chat_template(CHATS[1])
    for again in (Tokenizer.load(tmp_path / "a"), Tokenizer.load(tmp_path / "a" / "tokenizer.json"),
                  Tokenizer.from_json(tok.to_json())):
        assert again.special_token_ids == LLADA_IDS and again.chat_template == LLADA
        assert again.token_strings == tok.token_strings and again.apply_chat_template(CHATS[1]) == text
    # transformers reads what we saved and renders the same
    assert AutoTokenizer.from_pretrained(str(tmp_path / "a")).apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True) == text
    # without token_strings, the template sees the tokens at our ids
    derived = Tokenizer(_hf_tokenizer(), special_token_ids=LLADA_IDS)
    assert derived.token_strings == {"pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                                     "eos_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>"}
    assert Tokenizer.from_json(derived.to_json()).token_strings == derived.token_strings
    assert Tokenizer.from_json(derived.to_json()).chat_template is None


@pytest.mark.parametrize("field,value", [("eos_token_id", 29), ("mask_token_id", -1), ("pad_token_id", "1")])
def test_bad_special_ids(field, value):
    vocab = _hf_tokenizer().get_vocab_size(with_added_tokens=True)
    assert vocab == 29
    with pytest.raises(ValueError, match=f"special_token_ids.{field}"):
        Tokenizer(_hf_tokenizer(), special_token_ids={**LLADA_IDS, field: value})


def test_bad_special_ids_mask_and_keys():
    with pytest.raises(ValueError, match="mask_token_id=1 must differ"):
        Tokenizer(_hf_tokenizer(), special_token_ids={**LLADA_IDS, "mask_token_id": 1})
    with pytest.raises(ValueError, match="exactly the keys"):
        Tokenizer(_hf_tokenizer(), special_token_ids={"pad_token_id": 1})
    with pytest.raises(ValueError, match="token_strings keys"):
        Tokenizer(_hf_tokenizer(), special_token_ids=LLADA_IDS, token_strings={"im_start": "<|im_start|>"})


def test_default_tokenizer_unchanged(tmp_path):
    tok = Tokenizer.train(["def f(x): return x", "print('hello world')"] * 20, vocab_size=300)
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.special_token_ids == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "mask_token_id": 3}
    assert tok.chat_template is None and tok.to_json() == tok.hf.to_str()  # bare JSON, as before
    tok.save(tmp_path)
    assert not (tmp_path / "tokenizer_config.json").exists()
    for again in (Tokenizer.load(tmp_path), Tokenizer.from_json(tok.to_json())):
        assert again.special_token_ids == tok.special_token_ids and again.chat_template is None
        assert again.encode("print(x)") == tok.encode("print(x)")
    with pytest.raises(ValueError, match="lacks special tokens"):
        Tokenizer(_hf_tokenizer())
    # our own tokenizer may carry a template too, and keeps its default ids through a round trip
    templated = Tokenizer(tok.hf, chat_template=QWEN)
    templated.save(tmp_path / "t")
    again = Tokenizer.load(tmp_path / "t")
    assert again.chat_template == QWEN and again.special_token_ids == tok.special_token_ids
    assert "pllm_special_token_ids" not in json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())


def test_chat_prompt_for():
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")]
    plain = Tokenizer(Tokenizer.train(["hello there"] * 5, vocab_size=300).hf)
    assert chat_prompt_for(plain, messages) == chat_prompt(messages)
    llada = Tokenizer(_hf_tokenizer(), special_token_ids=LLADA_IDS, chat_template=LLADA)
    assert chat_prompt_for(llada, messages) == (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    strict = Tokenizer(_hf_tokenizer(), special_token_ids=LLADA_IDS, chat_template=STRICT)
    with pytest.raises(APIError) as err:
        chat_prompt_for(strict, messages)
    assert err.value.status == 400 and err.value.param == "messages"
    assert "roles must alternate" in err.value.body()["error"]["message"]
