"""A vision-language model behind an OpenAI-compatible chat-completions endpoint (Gemini, vLLM, OpenAI, ...).

    export FLUXSAE_AUTOINTERP_URL=https://generativelanguage.googleapis.com/v1beta/openai
    export FLUXSAE_AUTOINTERP_MODEL=gemini-2.0-flash
    export FLUXSAE_AUTOINTERP_KEY=...        # sent as "Authorization: Bearer <key>"
    backend = HttpChat()                     # every setting may also be passed explicitly

Images travel as PNG data URLs in `image_url` content parts. Rate limits (429), server errors
(5xx), timeouts and dropped connections are retried with exponential backoff and jitter (a
Retry-After header is honoured, up to `max_backoff`); other 4xx answers are not retried. A reply
that is not chat-completions JSON is "malformed", one with no text "empty": both are returned as
such, never as an answer. At most `max_concurrency` requests are in flight at once, however many
threads call `complete`. Only the standard library is used.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from PIL import Image

from fluxsae.autointerp.base import ChatResult

logger = logging.getLogger(__name__)

ENV_URL, ENV_MODEL, ENV_KEY = "FLUXSAE_AUTOINTERP_URL", "FLUXSAE_AUTOINTERP_MODEL", "FLUXSAE_AUTOINTERP_KEY"
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def data_url(image: Image.Image) -> str:
    """A PIL image as a PNG data URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def endpoint_of(url: str) -> str:
    """A base URL ("http://host/v1") or the full endpoint -> the chat-completions endpoint."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class HttpChat:
    """An OpenAI-compatible chat-completions client (see the module docstring)."""

    def __init__(
        self, url: str | None = None, model: str | None = None, api_key: str | None = None, *,
        timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
        max_concurrency: int = 4, max_tokens: int = 400, temperature: float = 0.0,
    ):  # fmt: skip
        url = url or os.environ.get(ENV_URL)
        model = model or os.environ.get(ENV_MODEL)
        if not url or not model:
            raise ValueError(
                f"the HTTP explainer needs an endpoint and a model: set {ENV_URL} (e.g. "
                f"http://localhost:8000/v1) and {ENV_MODEL} (e.g. gemini-2.0-flash), or pass url= and model=."
            )
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("max_concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        self.endpoint = endpoint_of(url)
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(ENV_KEY, "")
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.name = f"http:{model}"
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self.requests = 0
        """Requests sent by this client so far, retries included."""

    def payload(self, text: str, images: Sequence[Image.Image]) -> dict:
        content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
        content.append({"type": "text", "text": text})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}  # fmt: skip

    def complete(self, text: str, images: Sequence[Image.Image]) -> ChatResult:
        body = json.dumps(self.payload(text, images)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(attempt, retry_after)
            with self._lock:
                self.requests += 1
            try:
                with self._slots:
                    request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                    with urllib.request.urlopen(request, timeout=self.timeout) as response:
                        raw = response.read()
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code}: {err.read()[:300].decode(errors='replace')}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if err.code in RETRY_STATUS:
                    logger.info("chat request failed (%s), retrying (attempt %d)", error, attempt + 1)
                    continue
                return ChatResult(None, "error", attempt + 1, error)
            except (TimeoutError, urllib.error.URLError, OSError) as err:
                error = f"{type(err).__name__}: {err}"
                retry_after = None
                logger.info("chat request failed (%s), retrying (attempt %d)", error, attempt + 1)
                continue
            return self._read(raw, attempt + 1)
        logger.warning("chat request gave up after %d attempts: %s", self.max_retries + 1, error)
        return ChatResult(None, "error", self.max_retries + 1, error)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2 ** (attempt - 1) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass  # an HTTP date: the exponential delay is used
        time.sleep(min(delay, self.max_backoff))

    @staticmethod
    def _read(raw: bytes, requests: int) -> ChatResult:
        """A chat-completions response body -> its message text, or why there is none."""
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return ChatResult(None, "malformed", requests, raw[:300].decode(errors="replace"))
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return ChatResult(None, "malformed", requests, raw[:300].decode(errors="replace"))
        if not content.strip():
            return ChatResult(None, "empty", requests, "")
        return ChatResult(content, "ok", requests)
