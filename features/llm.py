"""Chat models behind one interface, for explaining and scoring features.

  OpenAIChat  any OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, ds4-server, a
              hosted API): base URL, model and the name of the API-key variable from config.
  LocalChat   a transformers model in this process (the embedded SmolLM2 in the demo;
              DeepSeek-V4-Flash on a cluster, labelling its own features).

Both answer `ask(messages, max_tokens, parse, prefix)`: `parse` turns the reply into a value or
raises ValueError, and a reply that does not parse is retried like a failed request. Only parsed replies
are cached (one JSON line per reply, keyed by a hash of the request), so a rerun repeats no call
that succeeded and retries every one that did not.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch
from activations.errors import DialboxError
from activations.errors import ConfigError


class LLMError(DialboxError, RuntimeError):
    """A request that failed after every retry; the message is the reason a feature is unlabelled."""


class ResponseCache:
    """Replies by request hash, in an append-only JSON-lines file (a torn last line is ignored)."""

    def __init__(self, path: Path | None):
        self.path, self.replies, self.lock = path, {}, threading.Lock()
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.replies[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError):
                    continue

    @staticmethod
    def key(request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.replies[key] = reply
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "reply": reply}) + "\n")


class ChatModel:
    """Retries, parsing and caching around one `_complete(messages, max_tokens, prefix) -> str` call.

    `prefix` starts the assistant's reply ("Explanation:"): a local model continues from it, which
    keeps small models on format; endpoints get the instruction alone (prefill is not portable).
    """

    name = ""
    concurrency = 1

    def __init__(self, cache: ResponseCache, retries: int = 3, backoff_s: float = 1.0):
        self.cache, self.retries, self.backoff_s = cache, retries, backoff_s

    def ask(self, messages: list[dict], max_tokens: int, parse: Callable[[str], object], prefix: str = ""):
        request = {"model": self.name, "messages": messages, "max_tokens": max_tokens, "prefix": prefix}
        key = self.cache.key(request)
        cached = self.cache.get(key)
        if cached is not None:
            return parse(cached)
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._complete(messages, max_tokens, prefix)
                value = parse(reply)
            except ValueError as e:
                reason = f"unusable reply: {e}"
                continue
            except LLMError as e:
                reason = str(e)
                continue
            self.cache.put(key, reply)
            return value
        raise LLMError(f"{reason} (after {self.retries + 1} attempts)")

    def _complete(self, messages: list[dict], max_tokens: int, prefix: str) -> str:
        raise NotImplementedError


class OpenAIChat(ChatModel):
    def __init__(self, base_url: str, model: str, api_key_env: str, cache: ResponseCache, concurrency: int = 8,
                 retries: int = 3, backoff_s: float = 1.0, timeout_s: float = 60.0):
        super().__init__(cache, retries, backoff_s)
        if not model:
            raise ConfigError("explainer=openai needs explainer.model, the model name the endpoint serves")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name, self.concurrency, self.timeout_s = model, concurrency, timeout_s
        # The key is read from the environment and kept out of every config, log and cache.
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""

    def _complete(self, messages: list[dict], max_tokens: int, prefix: str) -> str:
        body = json.dumps({"model": self.name, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, body.encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise LLMError(f"{self.url} answered HTTP {e.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise LLMError(f"{self.url} unreachable ({getattr(e, 'reason', e)})") from None
        except json.JSONDecodeError:
            raise LLMError(f"{self.url} returned a body that is not JSON") from None
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.url} returned JSON without choices[0].message.content") from None


class LocalChat(ChatModel):
    """Greedy generation with a transformers model and its chat template; one request at a time."""

    def __init__(self, model, tokenizer, name: str, cache: ResponseCache, retries: int = 1):
        super().__init__(cache, retries, backoff_s=0.0)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()

    @torch.no_grad()
    def _complete(self, messages: list[dict], max_tokens: int, prefix: str) -> str:
        started = messages + [{"role": "assistant", "content": prefix}] if prefix else messages
        ids = self.tokenizer.apply_chat_template(started, add_generation_prompt=not prefix, continue_final_message=bool(prefix),
                                                 return_tensors="pt", return_dict=True)
        device = self.model.get_input_embeddings().weight.device
        with self.lock:
            out = self.model.generate(**{k: v.to(device) for k, v in ids.items()}, max_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return prefix + self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
