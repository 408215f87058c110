"""An HTTP server for a built report (features/report.py) that serves the report and nothing else.

    server = make_server(Path("runs/demo/report"), port=0)   # port 0 picks a free one
    server.serve_forever()

Beyond Python's static file server it promises (tests/test_report.py and test_browser.py keep them):
the Host and Origin checks and connection bounds of features/local_http.py, so no other site's page
reads the report (corpus text included) through DNS rebinding; no directory listings; no file from
outside the report directory, through `..` or a symlink; a Content-Security-Policy that lets the
page load only its own files and be framed by no one;
`X-Content-Type-Options: nosniff`, so a JSON file never runs as a script; no Python version in
the `Server` header; and `Cache-Control: no-cache`, so a report rebuilt while a tab is open
does not mix with cached files of the old one.
"""

from __future__ import annotations

from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

from features.local_http import LocalHandler, LocalServer

# The same policy as index.html's <meta> tag, plus frame-ancestors, which only a header can set.
CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


class ReportHandler(LocalHandler, SimpleHTTPRequestHandler):
    timeout = 30  # seconds a silent connection may hold its thread

    def __init__(self, *args, directory: str, **kwargs):
        self.root = Path(directory).resolve()
        super().__init__(*args, directory=str(self.root), **kwargs)

    def version_string(self) -> str:
        return "dialbox"  # http.server would show its Python version

    def end_headers(self) -> None:
        for name, value in HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def send_head(self):
        if not self.inside_report(self.translate_path(self.path)):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()

    def inside_report(self, path: str) -> bool:
        # translate_path drops `..`, but a symlink inside the report can still point out of it.
        try:
            return Path(path).resolve().is_relative_to(self.root)
        except ValueError:  # a NUL byte (%00) names no file
            return False

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "File not found")  # a directory is not a page of the report
        return None


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8765, allowed_hosts=()) -> LocalServer:
    """A server for the report at `root` (port 0 picks a free one); call serve_forever() on it.

    allowed_hosts: Host names to answer to beyond the loopback ones and `host` (a reverse proxy's)."""
    return LocalServer((host, port), partial(ReportHandler, directory=str(root)), allowed_hosts)
