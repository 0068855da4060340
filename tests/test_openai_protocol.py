"""OpenAI request fields the server does not implement are refused with a 400 naming the field, never
silently dropped; their neutral values (what clients send by default) pass."""

import pytest
from pydantic import ValidationError

from pllm.actors.openai_protocol import ChatCompletionRequest, CompletionRequest, validation_error


@pytest.mark.parametrize("field, value, why", [
    ("logprobs", 3, "log-probabilities"), ("logprobs", True, "log-probabilities"), ("top_logprobs", 2, "log-prob"),
    ("echo", True, "echoed"), ("suffix", "return x", "infilling"), ("presence_penalty", 0.5, "repetition_penalty"),
    ("frequency_penalty", -1.0, "repetition_penalty"), ("logit_bias", {"50": 10}, "biases"), ("best_of", 3, "one"),
    ("tools", [{"type": "function"}], "tool calls"), ("response_format", {"type": "json_object"}, "plain text"),
])
@pytest.mark.parametrize("request_type, base", [
    (CompletionRequest, {"prompt": "a"}), (ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}]})])
def test_unsupported_fields_get_a_400_naming_them(request_type, base, field, value, why):
    with pytest.raises(ValidationError) as info:
        request_type.model_validate({**base, field: value})
    error = validation_error(info.value)
    assert error.status == 400 and error.param == field and why in error.message and field in error.message


def test_neutral_values_and_harmless_fields_pass():
    body = {"prompt": "a", "logprobs": None, "echo": False, "suffix": None, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "user": "someone", "n": 1}
    assert CompletionRequest.model_validate(body).prompt_text == "a"
    with pytest.raises(ValidationError) as info:  # n > 1 is refused by its own type, naming n
        CompletionRequest.model_validate({"prompt": "a", "n": 2})
    assert validation_error(info.value).param == "n"
