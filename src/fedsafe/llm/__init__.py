"""Text generation backends behind one :class:`Generator` protocol.

``EndpointGenerator`` talks to an OpenAI-compatible server; ``HFGenerator`` runs a local transformers
model (imported lazily so that using the endpoint client does not import torch).
"""

from .base import Generator, Message, Prompt, to_messages
from .endpoint import EndpointConfig, EndpointGenerator

__all__ = ["Generator", "Message", "Prompt", "to_messages", "EndpointConfig", "EndpointGenerator", "HFGenerator"]


def __getattr__(name: str):
    if name == "HFGenerator":
        from .hf import HFGenerator

        return HFGenerator
    raise AttributeError(name)
