"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of autoscaled
Generator replicas.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events: text is sent as soon as its tokens are final, in order), GET /v1/models, GET /health.
Start it with `serve run serve_config.yaml` (the `app_builder` below) or `pllm serve --model ...`
(`--draft-model ...` adds a draft model to every replica, for requests with strategy "speculative").
"""


import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pllm.checkpoint import load_config, load_tokenizer
from pllm.config import EngineConfig, GenerationConfig
from pllm.decoding import DecodeRules, check_draft_model
from pllm.engine import check_request, context_length, max_new_tokens_limit
from pllm.quantization import check_quantizable
from pllm.registry import resolve_model_source

from .generator_deployment import GeneratorDeployment
from .openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, chat_prompt_for, validation_error
from .text_stream import TextStream

app = FastAPI(title="Parallel-LLM", description="OpenAI-compatible API for masked-diffusion language models")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404
                                 else None).body(), status_code=exc.status_code)


async def parse_body(request: Request, model: type[BaseModel], max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is {declared} bytes; this server takes at most {max_bytes}",
                       code="request_too_large")
    raw = await request.body()
    if len(raw) > max_bytes:  # (a chunked body declares no length)
        raise APIError(413, f"the request body is {len(raw)} bytes; this server takes at most {max_bytes}",
                       code="request_too_large")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                       code="invalid_encoding") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def primed(pieces):
    """`pieces` (an async generator) with its first item already taken: errors it raises first are
    raised here, before a response starts."""
    try:
        first = await pieces.__anext__()
    except StopAsyncIteration:
        first = None

    async def chained():
        try:
            if first is not None:
                yield first
                async for piece in pieces:
                    yield piece
        finally:  # a client gone mid-stream closes this: close the source too (it cancels the generation)
            await pieces.aclose()

    return chained()


class RequestLimits(BaseModel):
    """What one request may ask of the server (`ServeArgs`): over a limit is a 4xx naming it."""

    model_config = ConfigDict(extra="forbid")

    max_request_bytes: PositiveInt = 1 << 20  # a larger body: 413
    max_prompt_tokens: Optional[PositiveInt] = None  # None: the context length
    max_tokens: Optional[PositiveInt] = None  # the most new tokens a request may ask for (None: the context)
    request_timeout_s: PositiveFloat = 600.0  # a request still running then is stopped (504; its slot freed)
    retry_after_s: PositiveInt = 1  # the Retry-After of a 429 when every replica's queue is full


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, generator: DeploymentHandle, model: str, model_name: str, mlflow_uri: Optional[str] = None,
                 engine: Optional[dict] = None, has_draft_model: bool = False, limits: Optional[dict] = None,
                 api_key_hashes: tuple[str, ...] = ()):
        """limits: `RequestLimits` fields; api_key_hashes: SHA-256 hex digests of the accepted keys
        (none: no authentication)."""
        self.limits = RequestLimits(**(limits or {}))
        self.api_key_hashes = api_key_hashes
        model_dir, generation = resolve_model_source(model, mlflow_uri)
        self.tokenizer = load_tokenizer(model_dir)
        self.model_config = load_config(model_dir)
        self.engine_config = EngineConfig.from_dict(engine or {})
        self.defaults = generation or GenerationConfig()
        self.generator, self.model_name, self.created = generator, model_name, int(time.time())
        self.has_draft_model = has_draft_model

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    def _authorize(self, request: Request) -> None:
        """Every route but /health needs `Authorization: Bearer KEY` when the server has keys."""
        if not self.api_key_hashes:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        if not any(hmac.compare_digest(digest, accepted) for accepted in self.api_key_hashes):
            raise APIError(401, "the API key is not valid for this server", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "pllm",
            "context_length": context_length(self.model_config, self.engine_config)}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = await parse_body(request, CompletionRequest, self.limits.max_request_bytes)
        if not body.prompt_text:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        return await self._respond(body, body.prompt_text, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await parse_body(request, ChatCompletionRequest, self.limits.max_request_bytes)
        prompt = chat_prompt_for(self.tokenizer, body.messages)
        return await self._respond(body, prompt, body.requested_max_tokens, chat=True)

    # -- shared path -------------------------------------------------------------------------------
    async def _respond(self, body, prompt: str, max_tokens: Optional[int], chat: bool):
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        prompt_ids = self.tokenizer.encode(prompt)
        limits, param = self.limits, "messages" if chat else "prompt"
        if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server's limit (max_prompt_tokens) "
                           f"is {limits.max_prompt_tokens}", param=param, code="prompt_too_long")
        if max_tokens is None:  # chat without a limit: up to the context
            max_tokens = min(max_new_tokens_limit(self.model_config, self.engine_config),
                             context_length(self.model_config, self.engine_config) - len(prompt_ids))
            if limits.max_tokens is not None:
                max_tokens = min(max_tokens, limits.max_tokens)
        elif limits.max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit (max_tokens) of "
                           f"{limits.max_tokens}", param="max_tokens", code="invalid_value")
        try:
            config = body.generation_config(self.defaults, max_tokens)
        except ValidationError as exc:
            raise validation_error(exc) from None
        rules = DecodeRules.from_config(config)
        if rules.speculative and not self.has_draft_model:
            raise APIError(400, "strategy 'speculative' needs a draft model, and this server has none "
                           "(start it with --draft-model)", param="strategy", code="invalid_value")
        try:
            rules.check_model(self.model_config)
        except ValueError as exc:
            raise APIError(400, str(exc), param="kv_cache", code="invalid_value") from None
        try:
            check_request(self.model_config, self.engine_config, len(prompt_ids), max_tokens, rules.draft_length)
        except ValueError as exc:
            param = "max_tokens" if "max_tokens=" in str(exc) else ("prompt" if not chat else "messages")
            raise APIError(400, str(exc), param=param, code="context_length_exceeded"
                           if "context" in str(exc) else "invalid_value") from None
        stream = self.generator.options(stream=True).generate.remote(prompt_ids, config.to_dict())
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        text = TextStream(self.tokenizer, body.stop_strings)
        # The first chunk before any byte is sent: an overloaded replica queue (429) or a request out
        # of time (504) is then an HTTP status, also for streams.
        pieces = await primed(self._run(stream, text))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(pieces, meta, chat, include_usage, len(prompt_ids)),
                                     media_type="text/event-stream")
        return await self._complete(pieces, meta, chat, len(prompt_ids))

    async def _chunks(self, stream):
        """The replica's chunks, within the request's deadline; a full replica queue is a 429."""
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s
        iterator = stream.__aiter__()
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                chunk = await asyncio.wait_for(iterator.__anext__(), timeout=max(remaining, 0.001))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise APIError(504, f"the request ran past this server's time limit (request_timeout_s) of "
                               f"{self.limits.request_timeout_s:g} s and was stopped", code="timeout",
                               type="server_error") from None
            except BackPressureError:
                raise APIError(429, "the server is at capacity: every replica's queue is full; retry later",
                               code="server_overloaded", type="rate_limit_error",
                               headers={"Retry-After": str(self.limits.retry_after_s)}) from None
            yield chunk

    async def _run(self, stream, text: TextStream):
        """Yield (new text, finish_reason or None, tokens generated) as chunks arrive; stop early on a
        stop string (cancelling the generation, which frees its slot)."""
        generated = 0
        try:
            async for chunk in self._chunks(stream):
                generated = chunk["num_generated"]
                delta, stopped = text.feed(chunk["token_ids"], final=chunk["finished"])
                if stopped:
                    yield delta, "stop", generated
                    return
                yield delta, chunk["finish_reason"], generated
                if chunk["finished"]:
                    return
        finally:
            try:
                stream.cancel()  # no-op when finished; otherwise the replica aborts the request
            except BackPressureError:  # it never reached a replica: nothing to cancel
                pass

    async def _complete(self, pieces, meta: dict, chat: bool, prompt_tokens: int) -> dict:
        parts, finish_reason, generated = [], None, 0
        async for delta, finish_reason, generated in pieces:
            parts.append(delta)
        content = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
                  if chat else {"index": 0, "text": content, "finish_reason": finish_reason, "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(prompt_tokens, generated)}

    async def _sse(self, pieces, meta: dict, chat: bool, include_usage: bool, prompt_tokens: int):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta: Optional[str], finish_reason=None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

        generated = 0
        try:
            if chat:
                yield event(None, role=True)
            async for delta, finish_reason, generated in pieces:
                if delta or finish_reason:
                    yield event(delta, finish_reason)
            if include_usage:
                yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': _usage(prompt_tokens, generated)})}\n\n"
        except APIError as exc:  # headers are sent: report the failure in the stream (e.g. the deadline)
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception as exc:
            yield f"data: {json.dumps(APIError(500, str(exc), type='server_error').body())}\n\n"
        yield "data: [DONE]\n\n"


# -- building the application ---------------------------------------------------------------------
class ServeArgs(BaseModel):
    """Arguments of the application (`args:` in serve_config.yaml, flags of `pllm serve`)."""

    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a saved model folder
    draft_model: Optional[str] = None  # same forms: a small model with the same tokenizer (speculative decoding)
    model_name: Optional[str] = None  # the id clients send as "model"; default: the registered name or folder name
    mlflow_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    device: str = "auto"  # "auto": cuda when the replica has a GPU
    engine: dict = {}  # EngineConfig fields
    quantize: Optional[Literal["int8", "fp8", "int4"]] = None  # weight-only quantization at load (pllm.quantization)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16
    upscale_delay_s: float = 30.0  # how long load must stay above target before adding a replica
    downscale_delay_s: float = 600.0  # ... and below target before removing one
    max_ongoing_requests: int = 64  # per replica: further requests queue at the caller (back-pressure)
    max_queued_requests: int = 256  # requests waiting for a replica beyond those; more get 429 + Retry-After
    num_gpus_per_replica: float = 0
    num_cpus_per_replica: float = 1
    # Authentication: clients send `Authorization: Bearer KEY`. api_key_file: one key per line (several
    # keys allow rotation); without either, $PLLM_API_KEY; none of them: no authentication.
    api_key: Optional[str] = None
    api_key_file: Optional[str] = None
    limits: RequestLimits = RequestLimits()

    def api_key_hashes(self) -> tuple[str, ...]:
        """SHA-256 digests of the accepted keys: the replicas' arguments hold no key itself."""
        if self.api_key_file:
            try:
                keys = [line.strip() for line in Path(self.api_key_file).read_text().splitlines()]
            except OSError as exc:
                raise ValueError(f"api_key_file: cannot read {self.api_key_file} ({exc.strerror})") from None
            keys = [k for k in keys if k and not k.startswith("#")]
            if not keys:
                raise ValueError(f"api_key_file: {self.api_key_file} holds no key")
        else:
            key = self.api_key or os.environ.get("PLLM_API_KEY")
            keys = [key.strip()] if key and key.strip() else []
        return tuple(hashlib.sha256(k.encode()).hexdigest() for k in keys)

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model.startswith("models:/"):
            return self.model[len("models:/"):].split("@")[0].split("/")[0]
        return os.path.basename(os.path.normpath(self.model))


def build_app(args: ServeArgs) -> serve.Application:
    EngineConfig.from_dict(args.engine)  # a bad engine config fails here, before any replica starts
    mlflow_uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.quantize:  # ... and a model whose projections this precision cannot quantize
        check_quantizable(load_config(resolve_model_source(args.model, mlflow_uri)[0]), args.quantize, args.model)
    if args.draft_model:  # ... and so does a draft model that cannot serve this target
        check_draft_model(load_config(resolve_model_source(args.model, mlflow_uri)[0]),
                          load_config(resolve_model_source(args.draft_model, mlflow_uri)[0]))
    key_hashes = args.api_key_hashes()  # an unreadable key file fails here too
    generator = GeneratorDeployment.options(
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        autoscaling_config={"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                            "target_ongoing_requests": args.target_ongoing_requests,
                            "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s},
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica},
    ).bind(args.model, mlflow_uri, args.engine, args.device, args.draft_model, args.quantize)
    return OpenAIIngress.bind(generator, args.model, args.served_name(), mlflow_uri, args.engine,
                              args.draft_model is not None, args.limits.model_dump(), key_hashes)


def app_builder(args: ServeArgs) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` configs (import_path: pllm.actors.serve_app:app_builder)."""
    return build_app(args)
