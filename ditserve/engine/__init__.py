"""The engine interface: `Engine` (load -> family pipeline -> cache -> compile -> CUDA graphs -> warmup),
`GenerationRequest` in, `Output` out, `Capabilities` declared by each family. The CLI, the server and the
bench speak only these."""

from ditserve.engine.engine import Engine
from ditserve.engine.request import Capabilities, GenerationRequest, Output

__all__ = ["Capabilities", "Engine", "GenerationRequest", "Output"]
