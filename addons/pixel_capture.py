"""mitmproxy script: decode, check and record tracking pixels in transit.

    mitmdump -s addons/pixel_capture.py
"""
