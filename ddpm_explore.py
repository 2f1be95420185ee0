"""Serve the explorer page: the shipped networks, live in your browser, offline.

    python ddpm_explore.py                     # prints http://127.0.0.1:8000/explorer/ ; Ctrl-C stops it
    python ddpm_explore.py --port 8080 --open  # another port, and open the page in the default browser

The page (explorer/) runs the ONNX exports of the shipped networks (python
ddpm_export.py writes them) with onnxruntime-web, whose WebAssembly files lie
in explorer/vendor/. The server sends the two headers that make the page
"cross-origin isolated" (COOP and COEP), which WebAssembly needs for threads:
with them the page runs the networks on 2 threads; from a host that cannot
send them (a plain static file host) it falls back to one.

Only the page's own files are served: explorer/, the ONNX files and their
records in model_ckpt/, and the PNGs of images/. The server listens on
127.0.0.1 only, unless --host says otherwise.
"""

import functools
import http.server
import os
import sys
import webbrowser

from ddpm.cli import ArgumentParser, int_in_range, run
from ddpm.errors import UserError

REPO = os.path.dirname(os.path.abspath(__file__))
PAGE = "/explorer/"
# what the page may load: (folder, file-name ending) pairs, relative to the repository
SERVED = (("explorer", ""), ("model_ckpt", ".onnx"), ("model_ckpt", ".onnx.json"), ("images", ".png"))
ISOLATION_HEADERS = {  # cross-origin isolation, for SharedArrayBuffer and so for WebAssembly threads
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def is_served(relative_path):
    """Whether a file, named relative to the repository with / between folders, is one of the page's (SERVED)."""
    parts = relative_path.split("/")
    if not parts or any(part.startswith(".") for part in parts):  # no dot-files, nothing above the repository
        return False
    folder, name = parts[0], parts[-1]
    return any(folder == top and (top == "explorer" or (len(parts) == 2 and name.endswith(end)))
               for top, end in SERVED)


class ExplorerHandler(http.server.SimpleHTTPRequestHandler):
    """Static files of the repository that the page needs (is_served), with the isolation headers."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".onnx": "application/octet-stream", ".json": "application/json"}
    isolate = True

    def do_GET(self):
        if self.path in ("/", ""):
            self.send_response(302)
            self.send_header("Location", PAGE)
            self.end_headers()
            return
        if self._refused():
            return
        super().do_GET()

    def do_HEAD(self):
        if self._refused():
            return
        super().do_HEAD()

    def _refused(self):
        """Send 404 unless the request names one of the page's files, as the file system resolves it (links,
        "..", %2e%2e and all); True when refused."""
        target = os.path.realpath(self.translate_path(self.path))
        relative = os.path.relpath(target, os.path.realpath(self.directory)).replace(os.sep, "/")
        if relative == "explorer" or is_served(relative):
            return False
        self.send_error(404, "not a file of the explorer")
        return True

    def end_headers(self):
        if self.isolate:
            for name, value in ISOLATION_HEADERS.items():
                self.send_header(name, value)
        self.send_header("Cache-Control", "no-cache")  # a re-export shows at the next reload
        super().end_headers()

    def log_message(self, format, *args):  # quiet: a line per file would drown the URL
        pass


def parse_args(argv=None):
    parser = ArgumentParser(description="Serve the explorer page (the shipped networks, live in a browser) on this "
                                        "machine.")
    parser.add_argument("--port", type=int_in_range(1, 65535), default=8000, help="port to listen on")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--open", action="store_true", help="also open the page in the default web browser")
    parser.add_argument("--no_isolation", action="store_true",
                        help="send no COOP/COEP headers, as a plain static host would: the page then runs on one "
                             "thread")
    return parser.parse_args(argv)


def missing_files():
    """The exported networks that the page needs and that are not there (python ddpm_export.py writes them)."""
    from ddpm.onnx_export import SHIPPED, onnx_path_for, record_path_for

    needed = [path for checkpoint in SHIPPED for path in (onnx_path_for(checkpoint),
                                                            record_path_for(onnx_path_for(checkpoint)))]
    return [path for path in needed if not os.path.exists(os.path.join(REPO, path))]


def make_server(host, port, isolate=True):
    """The HTTP server of the explorer, bound to (host, port); UserError where that address cannot be had."""
    handler = type("Handler", (ExplorerHandler,), {"isolate": isolate})
    try:
        return http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=REPO))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                        "choose another --port, or stop what uses this one") from None


def main(argv=None):
    args = parse_args(argv)
    missing = missing_files()
    if missing:
        raise UserError(f"the page needs {', '.join(missing)}: run python ddpm_export.py first")
    server = make_server(args.host, args.port, isolate=not args.no_isolation)
    url = f"http://{args.host}:{server.server_address[1]}{PAGE}"
    print(f"The explorer is at {url}  (Ctrl-C stops the server)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    run(main)
