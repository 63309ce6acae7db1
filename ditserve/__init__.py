"""ditserve: an inference engine for diffusion transformers.

Importing the package changes no global state: no compiler flags, no logging handlers, no device probing.
The CLI and the server own those.
"""

__version__ = "0.1.0"
