"""Layer 4: the local API server that the SDK and CLI talk to, with live push streams."""
