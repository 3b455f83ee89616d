"""meshd: a peer-to-peer mesh for AI-agent sessions. Importing this package has no side effects."""

__version__ = "0.1.0"
