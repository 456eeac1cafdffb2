"""Request bodies of the serving API: OpenAI chat completions and the simple JSON `/generate`.

Every text field has a length bound and numbers reject NaN/inf, so an oversized or degenerate body is
refused (400 naming the field) before any rendering or tokenisation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from latentmas.services.sampling import SamplingParams
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

DEFAULT_MAX_TOKENS = 64
MAX_TEXT_CHARS = 262_144  # one prompt, system prompt or message; the server's maxPromptTokens bound is tighter
MAX_MESSAGES = 512
MAX_NAME_CHARS = 128
MAX_STOP_CHARS = 256
ROUTER_TEMPERATURE_RANGE = (1e-3, 1e4)
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


def integral(value: Any) -> Any:
    """JSON Schema's integer includes 2.0; strict mode would refuse it (and rightly refuses "2" and true)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(integral)]
STRICT = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)  # no "1" for 1, no 0 for false


class SamplingFields(BaseModel):
    model_config = STRICT

    max_tokens: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = Field(
        None, description="Default: 64, or the server cap if lower."
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: JsonInt = Field(0, ge=0, le=1_000_000)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="Up to 4 stop strings."
    )
    router_temperature: float | None = Field(
        None,
        ge=ROUTER_TEMPERATURE_RANGE[0],
        le=ROUTER_TEMPERATURE_RANGE[1],
        description="Overrides the router temperature.",
    )

    def sampling(self, cap: int) -> SamplingParams:
        """Sampling parameters; an unset max_tokens takes the default, never more than the server `cap`."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else min(DEFAULT_MAX_TOKENS, cap),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(s for s in stops if s),
        )


class TextPart(BaseModel):
    """One part of an OpenAI content array; only text is served (the base model reads no images)."""

    model_config = STRICT

    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)] = Field(
        description="A string, or an array of text parts (joined with newlines)."
    )

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        """A clear refusal for image/audio/file parts instead of a union mismatch."""
        parts = data.get("content") if isinstance(data, dict) else None
        if isinstance(parts, list):
            for i, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(
                        f"content[{i}]: parts of type {kind!r} are not supported; the served base model reads text only"
                    )
        return data

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = Field(False, description="Send a last chunk with `usage` and empty `choices`.")


class ChatCompletionRequest(SamplingFields):
    model: str = Field(
        "auto", max_length=MAX_NAME_CHARS, description="An expert name, 'auto' for the router, or 'base'."
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: JsonInt = Field(1, ge=1, le=1, description="Only one choice per request is served.")
    max_completion_tokens: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = None

    def sampling(self, cap: int) -> SamplingParams:
        params = super().sampling(cap)
        if self.max_completion_tokens is not None:
            params = SamplingParams(
                max_tokens=self.max_completion_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                stop=params.stop,
            )
        return params


class GenerateRequest(SamplingFields):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    system_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    session_id: str | None = Field(None, max_length=MAX_NAME_CHARS)
    conversation_id: str | None = Field(None, max_length=MAX_NAME_CHARS)
    lora_adapter: str | None = Field(
        None, max_length=MAX_NAME_CHARS, description="Expert name; omitted or 'auto' lets the router choose."
    )
    list_loras: bool = False


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: Annotated[int, Field(ge=1, le=2**31 - 1), BeforeValidator(integral)] | None = Field(
        None, description="Registry version to serve; default: the registry's current."
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    """Every error the service returns: `{"error": {"message", "type", "param", "code"}}` (code = HTTP status)."""

    error: ErrorDetail
