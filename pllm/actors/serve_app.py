"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of autoscaled
Generator replicas.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events: text is sent as soon as its tokens are final, in order), GET /v1/models, GET /health.
Start it with `serve run serve_config.yaml` (the `app_builder` below) or `pllm serve --model ...`
(`--draft-model ...` adds a draft model to every replica, for requests with strategy "speculative").
"""


import json
import os
import time
import uuid
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
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
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404
                                 else None).body(), status_code=exc.status_code)


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, generator: DeploymentHandle, model: str, model_name: str, mlflow_uri: Optional[str] = None,
                 engine: Optional[dict] = None, has_draft_model: bool = False):
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

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "pllm",
            "context_length": context_length(self.model_config, self.engine_config)}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await parse_body(request, CompletionRequest)
        if not body.prompt_text:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        return await self._respond(body, body.prompt_text, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        prompt = chat_prompt_for(self.tokenizer, body.messages)
        return await self._respond(body, prompt, body.requested_max_tokens, chat=True)

    # -- shared path -------------------------------------------------------------------------------
    async def _respond(self, body, prompt: str, max_tokens: Optional[int], chat: bool):
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        prompt_ids = self.tokenizer.encode(prompt)
        if max_tokens is None:  # chat without a limit: up to the context
            max_tokens = min(max_new_tokens_limit(self.model_config, self.engine_config),
                             context_length(self.model_config, self.engine_config) - len(prompt_ids))
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
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(stream, text, meta, chat, include_usage, len(prompt_ids)),
                                     media_type="text/event-stream")
        return await self._complete(stream, text, meta, chat, len(prompt_ids))

    async def _run(self, stream, text: TextStream):
        """Yield (new text, finish_reason or None, tokens generated) as chunks arrive; stop early on a
        stop string (cancelling the generation, which frees its slot)."""
        generated = 0
        try:
            async for chunk in stream:
                generated = chunk["num_generated"]
                delta, stopped = text.feed(chunk["token_ids"], final=chunk["finished"])
                if stopped:
                    yield delta, "stop", generated
                    return
                yield delta, chunk["finish_reason"], generated
                if chunk["finished"]:
                    return
        finally:
            stream.cancel()  # no-op when finished; otherwise the replica aborts the request

    async def _complete(self, stream, text: TextStream, meta: dict, chat: bool, prompt_tokens: int) -> dict:
        parts, finish_reason, generated = [], None, 0
        async for delta, finish_reason, generated in self._run(stream, text):
            parts.append(delta)
        content = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
                  if chat else {"index": 0, "text": content, "finish_reason": finish_reason, "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(prompt_tokens, generated)}

    async def _sse(self, stream, text: TextStream, meta: dict, chat: bool, include_usage: bool, prompt_tokens: int):
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
            async for delta, finish_reason, generated in self._run(stream, text):
                if delta or finish_reason:
                    yield event(delta, finish_reason)
            if include_usage:
                yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': _usage(prompt_tokens, generated)})}\n\n"
        except Exception as exc:  # headers are sent: report the failure in the stream
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
    num_gpus_per_replica: float = 0
    num_cpus_per_replica: float = 1

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
    generator = GeneratorDeployment.options(
        max_ongoing_requests=args.max_ongoing_requests,
        autoscaling_config={"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                            "target_ongoing_requests": args.target_ongoing_requests,
                            "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s},
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica},
    ).bind(args.model, mlflow_uri, args.engine, args.device, args.draft_model, args.quantize)
    return OpenAIIngress.bind(generator, args.model, args.served_name(), mlflow_uri, args.engine,
                              args.draft_model is not None)


def app_builder(args: ServeArgs) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` configs (import_path: pllm.actors.serve_app:app_builder)."""
    return build_app(args)
