"""Choose the chat backend of the data generator: a local transformers model or an HTTP endpoint."""

from __future__ import annotations

from collections.abc import Mapping

from llmseg_ros.datagen.config import LLMConfig
from llmseg_ros.datagen.llm import ChatClient, OpenAIChatClient


def build_client(config: LLMConfig, environ: Mapping[str, str] | None = None) -> ChatClient:
    """The local backend when ``config.local_model`` is set, else the HTTP client."""
    if config.local_model is not None:
        from llmseg_ros.datagen.local_llm import TransformersChatClient

        return TransformersChatClient.from_config(config)
    return OpenAIChatClient.from_config(config, environ)
