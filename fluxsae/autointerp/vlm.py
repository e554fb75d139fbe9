"""A local vision-language model through `transformers` as the explainer's and the judge's backend.

    backend = TransformersVLM("Qwen/Qwen2-VL-2B-Instruct", device="cuda")     # any image-text-to-text model
    explainer, judge = ChatExplainer(backend), ChatJudge(backend)

The model is loaded with `AutoModelForImageTextToText` and its `AutoProcessor` (never with remote
code); a model and processor already built can be passed instead (the tests build a tiny random
one from a config). The user turn is laid out by the processor's chat template (images first, then
the text), decoding is greedy by default, and `generation_kwargs` go to `generate` unchanged (e.g.
a `logits_processor`, `max_new_tokens`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch
from PIL import Image

from fluxsae.autointerp.base import ChatResult

logger = logging.getLogger(__name__)


class TransformersVLM:
    """Completes one user turn (images + text) with a transformers vision-language model."""

    def __init__(
        self, model_id: str | None = None, *, model=None, processor=None, device: str | None = None,
        dtype: torch.dtype | None = None, max_new_tokens: int = 300, generation_kwargs: dict | None = None,
    ):  # fmt: skip
        if (model is None) != (processor is None) or (model is None) == (model_id is None):
            raise ValueError("pass either model_id (a Hub id or folder) or both model= and processor=")
        if model is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=False)
            model = AutoModelForImageTextToText.from_pretrained(
                model_id, trust_remote_code=False, dtype=dtype or "auto"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.generation_kwargs = dict(generation_kwargs or {})
        named = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.name = f"transformers:{named}"
        self._lock = threading.Lock()  # one generate() at a time: the model is not thread-safe

    def complete(self, text: str, images: Sequence[Image.Image]) -> ChatResult:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=prompt, images=list(images) or None, return_tensors="pt")
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **self.generation_kwargs}
        with self._lock, torch.no_grad():
            try:
                out = self.model.generate(**inputs, **kwargs)
            except (RuntimeError, ValueError) as err:
                logger.warning("generate() failed: %s", err)
                return ChatResult(None, "error", 1, f"{type(err).__name__}: {err}")
        new = out[:, inputs["input_ids"].shape[1]:]
        answer = self.processor.batch_decode(new, skip_special_tokens=True)[0]
        if not answer.strip():
            return ChatResult(None, "empty", 1)
        return ChatResult(answer, "ok", 1)
