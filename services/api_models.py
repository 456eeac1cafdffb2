"""Request bodies of the serving API: OpenAI chat completions and the simple JSON `/generate`."""

from __future__ import annotations

from typing import Literal

from latentmas.services.sampling import SamplingParams
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TOKENS = 64


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1, description="Default: 64, or the server cap if lower.")
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    router_temperature: float | None = Field(None, gt=0.0, description="Overrides the router temperature.")

    def sampling(self, cap: int) -> SamplingParams:
        """Sampling parameters; an unset max_tokens takes the default, never more than the server `cap`."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else min(DEFAULT_MAX_TOKENS, cap),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(s for s in stops[:4] if s),
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    model: str = Field("auto", description="An expert name, 'auto' for the router, or 'base'.")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is served.")
    max_completion_tokens: int | None = Field(None, ge=1)

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
    prompt: str = Field(min_length=1)
    system_prompt: str | None = None
    session_id: str | None = None
    conversation_id: str | None = None
    lora_adapter: str | None = Field(None, description="Expert name; omitted or 'auto' lets the router choose.")
    list_loras: bool = False


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, description="Registry version to serve; default: the registry's current.")
