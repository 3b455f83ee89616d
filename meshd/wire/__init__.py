"""Layer 1: bytes <-> validated values. No sockets, no event loop, no database."""
