"""Run the blocks of the seed document verbatim, in the document's order, as a reader
would: Python blocks one after another in one interpreter (later blocks use the names
earlier ones imported or made), shell blocks with bash. Prints one JSON line per block.

Usage: python seed_runner.py SEED.md   (with MESHD_SOCKET naming a running daemon, and a
`python` on PATH that has the package)

Blocks that cannot run verbatim anywhere are reported as skipped, with the reason: the
Install block (a path of the seed's own repository), the CLI synopsis (placeholders such as
<id>), and diagrams. Where the document shows output (an "Output:" block, a "# Output:"
comment), it is reported beside what the block printed, for the test to compare.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import traceback


def blocks(text: str) -> list[dict]:
    out, heading, lines, i = [], "", text.splitlines(), 0
    before = ""
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        m = re.match(r"^```(\w*)\s*$", line)
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append({"line": i + 1, "heading": heading, "lang": m.group(1),
                        "code": "\n".join(lines[i + 1:j]) + "\n", "before": before})
            i = j + 1
            continue
        if line.strip():
            before = line.strip()
        i += 1
    return out


def kind(b: dict) -> str:
    code = b["code"]
    if "pip install" in code:
        return "install"
    if b["before"].rstrip(":").lower() == "output":
        return "output"
    if re.search(r"^\s*(from sessions import|import sessions)|\w+ = \w+\(", code, re.M):
        return "python"
    if "python -m sessions" in code:
        return "synopsis" if re.search(r"<\w+>", code) else "cli"
    return "diagram"


def shown_output(code: str) -> list[str]:
    return [m.strip() for m in re.findall(r"#\s*Output:\s*(.+)$", code, re.M)]


def main() -> None:
    doc = open(sys.argv[1], encoding="utf-8").read()
    namespace: dict = {"__name__": "__seed__"}
    for b in blocks(doc):
        k = kind(b)
        rec = {"line": b["line"], "heading": b["heading"], "kind": k, "ok": True,
               "stdout": "", "error": "", "shown": shown_output(b["code"])}
        if k == "python":
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(compile(b["code"], f"<seed line {b['line']}>", "exec"), namespace)
            except Exception:
                rec["ok"], rec["error"] = False, traceback.format_exc(limit=3)
            rec["stdout"] = buf.getvalue()
        elif k == "cli":
            r = subprocess.run(["bash", "-e", "-c", b["code"]], capture_output=True, text=True,
                               timeout=60)
            rec["ok"], rec["stdout"], rec["error"] = r.returncode == 0, r.stdout, r.stderr
        elif k == "output":
            rec["shown"] = b["code"].splitlines()
        print(json.dumps(rec, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
