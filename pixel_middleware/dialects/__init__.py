"""The dialects, one module each, behind the :class:`~.base.Dialect` interface.

:data:`DIALECTS` maps each name to its dialect, in the order their routes are
matched: where two dialects claim the same path (``POST /v1/track`` is both
Segment's and RudderStack's HTTP API), the first one enabled owns it. Adding a
dialect: one module here, a row in :data:`DIALECTS`, its tests and its row in
docs/dialects.md ("Adding a dialect").
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pixel_middleware.dialects.base import Dialect
from pixel_middleware.dialects.google_analytics import GA4, UNIVERSAL_ANALYTICS
from pixel_middleware.dialects.jitsu import JITSU
from pixel_middleware.dialects.matomo import MATOMO
from pixel_middleware.dialects.meta import META
from pixel_middleware.dialects.posthog import POSTHOG
from pixel_middleware.dialects.rudderstack import RUDDERSTACK
from pixel_middleware.dialects.segment import SEGMENT
from pixel_middleware.dialects.snowplow import SNOWPLOW

__all__ = ["DIALECTS", "Dialect"]

DIALECTS: Mapping[str, Dialect] = MappingProxyType(
    {
        dialect.name: dialect
        for dialect in (
            SEGMENT,
            RUDDERSTACK,
            GA4,
            UNIVERSAL_ANALYTICS,
            META,
            SNOWPLOW,
            MATOMO,
            POSTHOG,
            JITSU,
        )
    }
)
