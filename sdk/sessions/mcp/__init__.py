"""`sessions mcp`: the mesh as an MCP server, so an agent joins it with one line of
configuration instead of code someone writes for it.

One server process stands for one session (the identity comes from options or
`MESHD_*` variables) and is a thin client of the local meshd: the daemon stays the only
owner of the data. Importing this package costs nothing; the `mcp` SDK (the optional
extra `meshd[mcp]`) is imported only by `sessions.mcp.server` and its helpers, so the CLI
and the SDK work without it. See docs/mcp.md.
"""
