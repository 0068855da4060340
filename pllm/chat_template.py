"""Render a checkpoint's Jinja chat template as `transformers`' `apply_chat_template` does: a sandboxed
environment with trim_blocks/lstrip_blocks, the `raise_exception`, `strftime_now`, `dict` and
`namespace` globals and a `tojson` filter that does not escape HTML."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` for templates without handing them the type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could reach interpreter internals."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace, so namespace(self=...) works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        super().__setitem__(name, value)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render it plainly."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
    """The template rendered for `messages`; `variables` (bos_token, eos_token, tools, ...) are visible to it.
    A template error, including the template's own `raise_exception`, becomes ValueError("chat template: ...")."""
    # transformers drops None-valued keys: templates test for a key's presence, not for None.
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = {"tools": None, "documents": None, **variables}
    try:
        return compile_template(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                                 **context)
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat template: {exc}") from None
    except TypeError as exc:  # e.g. the template adds a string to a missing field: the input doesn't fit it
        raise ValueError(f"chat template: {exc}") from None
