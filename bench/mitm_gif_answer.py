"""mitmproxy script: answer every request locally with the 1x1 GIF, and do nothing else.

The bare mitmdump the pixel addon is measured against (bench/mitm.py)::

    mitmdump --mode reverse:http://127.0.0.1:9 --set connection_strategy=lazy \\
        -s bench/mitm_gif_answer.py
"""

from mitmproxy import http

from pixel_middleware.core import GIF

HEADERS = {
    "Content-Type": "image/gif",
    "Cache-Control": "no-cache, no-store, must-revalidate",
}


def request(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(200, GIF, HEADERS)
