"""Request bodies of `mrtune serve` (pydantic): the fields each endpoint reads, with their types checked strictly.

`/v1/parse` refuses unknown fields (a typo should not pass silently). The OpenAI-compatible bodies accept and
ignore the options clients commonly send (temperature, top_p, max_tokens, user, ...): decoding is always greedy and
every completion is one whole MR within the run's eval.max_new_tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class ParseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sentences: list[StrictStr] = Field(min_length=1)


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    n: int = 1
    stream: bool = False


class CompletionRequest(OpenAIRequest):
    prompt: StrictStr | list[StrictStr]
    """The model's whole input, as with any completions API: the run's training prompt around a sentence (the
    `/v1/chat/completions` endpoint and `/v1/parse` build it for you)."""


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
