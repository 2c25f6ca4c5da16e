"""mitmproxy script: decode, check and record tracking pixels in transit.

Point a browser, a mail client or an ad tag's device at the proxy and every
Segment or RudderStack pixel request is decoded, checked and logged, with what the
real collector answered, without changing the sender::

    mitmdump -s addons/pixel_capture.py
    mitmdump -s addons/pixel_capture.py --set pixel_store=sqlite:///pixels.sqlite3
    mitmdump -s addons/pixel_capture.py --mode reverse:http://127.0.0.1:8000
    mitmweb -s addons/pixel_capture.py --set pixel_answer=true

The options (``--set name=value``; add ``--options`` to list them with help):
pixel_store, pixel_answer, pixel_filter, pixel_prefix, pixel_dialects,
pixel_write_keys, pixel_trusted_proxies, pixel_rudderstack_response,
pixel_routes, pixel_log, pixel_history.
Commands (mitmproxy's and mitmweb's command prompt): pixel.export PATH,
pixel.summary, pixel.clear. Show only pixels in the flow list with the filter
~meta "^pixel: ". See docs/mitmproxy.md.

The addon lives in the package (``pixel_middleware.mitm``). A mitmproxy that
cannot import the installed package (the standalone binaries, a pipx install)
loads it from this checkout instead: the decoding core and the stores it needs use
only the standard library.
"""

import sys
from pathlib import Path

try:
    from pixel_middleware.mitm import PixelCapture
except ModuleNotFoundError as e:
    if e.name != "pixel_middleware":
        raise
    # The checkout root, the parent of addons/. (No module-level name here may be
    # a hook name such as `load` or `error`: mitmproxy would call it.)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pixel_middleware.mitm import PixelCapture

addons = [PixelCapture()]
