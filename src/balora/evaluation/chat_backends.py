"""Chat backends: anything that turns a chat into a reply, for the MT-Bench judge (and answerer).

Two implement :class:`ChatBackend`:

* :class:`OpenAICompatibleBackend` -- any ``/chat/completions`` HTTP server (a hosted API, or a
  local vLLM / llama.cpp / TGI server), using only the standard library;
* :class:`LocalModelBackend` -- a transformers causal LM with a chat template, replying greedily
  through the one generation loop (:func:`balora.evaluation.generate.chat_reply`).

:func:`make_judge` builds the judge that ``balora evaluate mt-bench`` asks for (``--judge``,
``--judge-model``, ``--judge-url``); :func:`backend_name` names a backend in the metrics.
Backend failures raise :class:`JudgeError` with a one-line message that never holds the API key.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, NoReturn, Protocol, runtime_checkable

from balora.models import load_causal_lm
from balora.regularizers.common import check_int

from .generate import chat_reply

__all__ = [
    "DEFAULT_OPENAI_JUDGE",
    "OPENAI_URL",
    "ChatBackend",
    "JudgeError",
    "LocalModelBackend",
    "Message",
    "OpenAICompatibleBackend",
    "backend_name",
    "make_judge",
]

logger = logging.getLogger("balora")

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_JUDGE = "gpt-4"

#: One chat message: ``{"role": "system" | "user" | "assistant", "content": text}``.
Message = dict[str, str]


class JudgeError(ValueError):
    """A judge backend failed: bad credentials, an HTTP error, an unreadable reply, no server."""


@runtime_checkable
class ChatBackend(Protocol):
    """Anything that turns a chat (``[{"role": ..., "content": ...}, ...]``) into a reply string."""

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> str:
        """Return the assistant's reply to ``messages`` (at most ``max_tokens`` new tokens)."""
        ...


# --------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP backend
# --------------------------------------------------------------------------------------------

_MAX_BACKOFF_S = 60.0
_CHUNK_BYTES = 64 * 1024


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect handler that follows nothing: it hands every redirect to ``refuse``."""

    def __init__(self, refuse: Any) -> None:
        self._refuse = refuse

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib hook)
        fp.close()
        self._refuse(code, newurl)


class OpenAICompatibleBackend:
    """A judge (or answerer) behind an OpenAI-compatible ``POST {base_url}/chat/completions``.

    The API key is read once from the environment variable ``api_key_env`` and sent as
    ``Authorization: Bearer <key>``; it never appears in logs, ``repr`` or error messages.
    ``require_key=False`` allows local servers that need no key (the header is then omitted
    when the variable is unset). Redirects are refused with a :class:`JudgeError` (the key is never
    sent to their target). ``timeout_s`` bounds every socket operation and also the whole reply
    body, which must have arrived ``timeout_s`` seconds after the request was sent. HTTP 429, 5xx,
    connection resets and time-outs are retried up to ``max_retries`` times, waiting
    ``backoff_s * 2**attempt`` seconds (or the server's ``Retry-After``, at most 60 s); any
    other failure raises :class:`JudgeError` at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        require_key: bool = True,
        timeout_s: float = 60,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise JudgeError("model must be a non-empty model name (as the server knows it)")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise JudgeError("need max_retries >= 0, timeout_s > 0 and backoff_s >= 0")
        key = os.environ.get(api_key_env, "").strip()
        if require_key and not key:
            raise JudgeError(
                f"environment variable {api_key_env} is not set: export it with your API key "
                f"(or pass require_key=False for a local server that needs none)"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._key = key
        self._opener = urllib.request.build_opener(_RefuseRedirects(self._refuse_redirect))

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float) -> str:
        """POST the chat and return ``choices[0].message.content`` (retrying transient failures)."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        ).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            try:
                return self._parse_reply(self._post(body))
            except _Transient as exc:
                if attempt == self.max_retries:
                    raise JudgeError(
                        f"{self.url}: gave up after {attempt + 1} attempts, last error: {self._clean(str(exc))}"
                    ) from None
                delay = exc.retry_after if exc.retry_after is not None else self.backoff_s * 2**attempt
                delay = min(delay, _MAX_BACKOFF_S)
                logger.warning("judge request failed (%s); retrying in %.1f s", self._clean(str(exc)), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, body: bytes) -> bytes:
        """One HTTP attempt; raise :class:`_Transient` (retry) or :class:`JudgeError` (give up).

        Redirects are refused (the key must never reach another address). Besides the socket
        time-out, the reply body must be complete ``timeout_s`` seconds after the request: it is
        read in chunks and the deadline checked after each, so a drip-feeding server cannot hold
        the run.
        """
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return self._read_before(response, deadline)
        except urllib.error.HTTPError as err:
            self._raise_http(err)
        except OSError as err:  # URLError wraps socket errors raised while connecting
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError)):
                raise _Transient(f"{type(reason).__name__}: {reason}") from None
            raise JudgeError(
                f"{self.url}: cannot connect ({self._clean(str(reason))}); is the server running?"
            ) from None
        except http.client.HTTPException as err:  # e.g. a connection closed mid-reply
            raise _Transient(f"{type(err).__name__}: {err}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_before(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        """The reply body, read in chunks of at most 64 KiB; past ``deadline`` it is a time-out."""
        chunks = []
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete reply within {self.timeout_s:g} s")
            chunk = response.read1(_CHUNK_BYTES)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def _refuse_redirect(self, code: int, target: str) -> NoReturn:
        """Called for every 3xx redirect: following it would resend the key to ``target``."""
        raise JudgeError(
            f"{self.url}: HTTP {code} redirect to {self._clean(target)} refused (the API key is never "
            f"sent on); use the final URL as the base URL"
        )

    def _raise_http(self, err: urllib.error.HTTPError) -> NoReturn:
        """Turn an HTTP error status into :class:`_Transient` or :class:`JudgeError`."""
        detail = _error_detail(err)
        if err.code == 429 or 500 <= err.code < 600:
            raise _Transient(f"HTTP {err.code}: {detail}", _retry_after(err)) from None
        hint = " (check the API key in " + self.api_key_env + ")" if err.code in (401, 403) else ""
        raise JudgeError(f"{self.url}: HTTP {err.code}{hint}: {self._clean(detail)}") from None

    def _parse_reply(self, raw: bytes) -> str:
        """Extract the reply text from a chat-completions JSON body."""
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._clean(raw[:120].decode("utf-8", "replace"))
            raise JudgeError(
                f"{self.url}: reply is not a chat-completions JSON object with choices[0].message.content: {snippet!r}"
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.url}: choices[0].message.content is {type(content).__name__}, not text")
        return content

    def _clean(self, text: str) -> str:
        """One line, at most 200 characters, with the API key masked (servers may echo it)."""
        if self._key:
            text = text.replace(self._key, "***")
        text = " ".join(text.split())
        return text if len(text) <= 200 else text[:197] + "..."


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, reset, time-out)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's error message (``{"error": {"message": ...}}`` or raw text), else the reason."""
    try:
        raw = err.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        payload = json.loads(raw)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)
    except ValueError:
        pass
    return raw.strip() or str(err.reason)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    """The ``Retry-After`` header in seconds, when it is a number."""
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Local transformers backend
# --------------------------------------------------------------------------------------------


class LocalModelBackend:
    """A transformers causal LM as judge or answerer.

    The chat is rendered with the tokenizer's chat template (``add_generation_prompt=True``) and
    answered greedily by :func:`balora.evaluation.generate.chat_reply` (only the new text,
    special tokens removed). ``max_new_tokens`` caps every reply, whatever ``max_tokens`` a
    caller asks for. Being callable (``backend(messages)``), it can be the ``answer_fn`` of
    :func:`balora.evaluation.mt_bench.answer_questions`.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 512) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template: use an instruction-tuned model's tokenizer, "
                "or set tokenizer.chat_template"
            )
        check_int(max_new_tokens, "max_new_tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def __call__(self, messages: list[Message]) -> str:
        """Answer ``messages`` greedily with up to ``max_new_tokens`` tokens."""
        return self.complete(messages, max_tokens=self.max_new_tokens, temperature=0.0)

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float = 0.0) -> str:
        """Greedy reply of at most ``min(max_tokens, max_new_tokens)`` tokens.

        ``temperature`` is accepted for the :class:`ChatBackend` protocol and ignored: decoding
        is always greedy, so judgments are reproducible.
        """
        return chat_reply(self.model, self.tokenizer, messages,
                          max_new_tokens=max(1, min(max_tokens, self.max_new_tokens)))


# --------------------------------------------------------------------------------------------
# The MT-Bench judge
# --------------------------------------------------------------------------------------------


def _is_local_url(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def make_judge(judge: str = "openai", judge_model: str | None = None, base_url: str | None = None,
               *, max_new_tokens: int = 2048) -> ChatBackend:
    """The MT-Bench judge: ``"openai"`` = an OpenAI-compatible server at ``base_url`` (default the
    OpenAI API, key in ``OPENAI_API_KEY``; a localhost server needs no key) serving
    ``judge_model`` (default gpt-4); ``"local"`` = the causal LM ``judge_model`` loaded here."""
    if judge == "openai":
        url = base_url or OPENAI_URL
        return OpenAICompatibleBackend(url, judge_model or DEFAULT_OPENAI_JUDGE, require_key=not _is_local_url(url))
    if judge == "local":
        if not judge_model:
            raise ValueError("a local judge needs a model: pass --judge-model NAME_OR_PATH")
        lm, tokenizer = load_causal_lm(judge_model)
        return LocalModelBackend(lm, tokenizer, max_new_tokens=max_new_tokens)
    raise ValueError(f"unknown judge {judge!r}; choose openai or local")


def backend_name(backend: ChatBackend) -> str:
    """A short description of a backend for the metrics (never the API key)."""
    if isinstance(backend, OpenAICompatibleBackend):
        return f"{backend.model} at {backend.url}"
    if isinstance(backend, LocalModelBackend):
        return f"local {getattr(backend.model, 'name_or_path', '') or type(backend.model).__name__}"
    return type(backend).__name__
