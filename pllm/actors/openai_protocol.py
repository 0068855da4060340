"""The OpenAI-compatible request bodies, error objects and the chat prompt.

Requests are validated with pydantic; a failure becomes an OpenAI-style error object
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status. Beyond OpenAI's fields, a
request may choose the diffusion decoding (`strategy`, `steps`, `block_size`,
`confidence_threshold`, `parallel_factor`, `draft_length`, `adaptive_draft_length`, `kv_cache`;
"speculative" needs a server started with a draft model), `top_k` and `ignore_eos` (as in vLLM).
OpenAI fields that would change the answer but are not implemented (`UNSUPPORTED`: logprobs, echo,
suffix, presence/frequency penalties, ...) are refused with a 400 naming the field."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pllm.config import GenerationConfig

if TYPE_CHECKING:
    from pllm.tokenizer import Tokenizer


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields this server does not implement: a request that sets one to anything but its neutral
# value gets a 400 naming it (never silently ignored). Field -> (neutral values, why).
UNSUPPORTED = {
    "logprobs": ((None, False, 0), "token log-probabilities are not reported yet"),
    "top_logprobs": ((None, 0), "token log-probabilities are not reported yet"),
    "echo": ((None, False), "the prompt is not echoed back"),
    "suffix": ((None, ""), "infilling through suffix is not served yet"),
    "presence_penalty": ((None, 0, 0.0), "use repetition_penalty (a diffusion step commits many tokens at once)"),
    "frequency_penalty": ((None, 0, 0.0), "use repetition_penalty (a diffusion step commits many tokens at once)"),
    "logit_bias": ((None, {}), "logit biases are not applied"),
    "best_of": ((None, 1), "one completion per request"),
    "tools": ((None, []), "tool calls are not supported"),
    "tool_choice": ((None, "none"), "tool calls are not supported"),
    "response_format": ((None, {"type": "text"}), "only plain text responses"),
}


class SamplingFields(BaseModel):
    # Other unknown fields (user, metadata, ...) change nothing about the answer and are ignored;
    # the ones in UNSUPPORTED would, and are refused.
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[Annotated[int, Field(gt=0)]] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Literal[1] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    # Parallel-LLM extensions
    top_k: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    strategy: Optional[Literal["static", "threshold", "factor", "credit", "draft_verify", "speculative"]] = None
    steps: Optional[Annotated[int, Field(gt=0)]] = None
    block_size: Optional[Annotated[int, Field(gt=0)]] = None
    confidence_threshold: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    parallel_factor: Optional[Annotated[float, Field(gt=0.0)]] = None
    draft_length: Optional[Annotated[int, Field(gt=0, le=16)]] = None
    adaptive_draft_length: Optional[bool] = None
    kv_cache: Optional[Literal["auto", "none", "block", "prefix", "dual"]] = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, (neutral, why) in UNSUPPORTED.items():
                value = data.get(name)
                if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
                    raise PydanticCustomError("unsupported", "{field}={value} is not supported by this server: {why}",
                                              {"field": name, "value": repr(value), "why": why})
        return data

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def generation_config(self, defaults: GenerationConfig, max_tokens: int) -> GenerationConfig:
        """This request's decoding settings; unset fields come from the served model's defaults, with
        the steps scaled to keep the default tokens per step."""
        steps = self.steps or max(1, math.ceil(max_tokens * defaults.num_refinement_steps / defaults.max_new_tokens))
        return defaults.replace(
            max_new_tokens=max_tokens, num_refinement_steps=steps, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed,
            strategy=self.strategy or defaults.strategy,
            block_size=self.block_size if self.block_size is not None else defaults.block_size,
            confidence_threshold=(self.confidence_threshold if self.confidence_threshold is not None
                                  else defaults.confidence_threshold),
            use_adaptive_steps=not self.ignore_eos,
            **{name: getattr(self, name)
               for name in ("parallel_factor", "draft_length", "adaptive_draft_length", "kv_cache")
               if getattr(self, name) is not None})


class CompletionRequest(SamplingFields):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]
    max_tokens: Optional[Annotated[int, Field(gt=0)]] = 16  # OpenAI's default

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(gt=0)]] = None

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


ROLE_HEADERS = {"system": "### System:", "user": "### User:", "assistant": "### Assistant:"}


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain-text chat template: each message under a role header, ending with the assistant's."""
    turns = [f"{ROLE_HEADERS[m.role]}\n{m.content}\n\n" for m in messages]
    return "".join(turns) + ROLE_HEADERS["assistant"] + "\n"


def chat_prompt_for(tokenizer: Tokenizer, messages: list[ChatMessage]) -> str:
    """The chat prompt in the tokenizer's own chat template (an imported checkpoint's), else `chat_prompt`.
    A template that rejects the messages (e.g. its raise_exception) is the client's error: a 400."""
    if tokenizer.chat_template is None:
        return chat_prompt(messages)
    try:
        return tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from None


class APIError(Exception):
    """An error for the client: becomes an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or first.get("ctx", {}).get("field")

    def where(e) -> str:
        return ".".join(str(p) for p in e["loc"]) or e.get("ctx", {}).get("field") or "body"

    messages = "; ".join(f"{where(e)}: {e['msg']}" for e in exc.errors())
    return APIError(400, messages, param=param, code="invalid_value")
