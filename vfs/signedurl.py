"""How long a signed CDN URL stays good, read from its query string.

The Hub's resolve redirects to a CDN URL signed for a limited time (about an hour on the
real Hub). A mount lives for weeks, so a URL kept since the first read runs out; asking
for it again a little before that costs one round trip to the Hub, while a read that
meets the CDN's 403 first costs a failed request. The forms read here are the presigned
URLs of S3 and GCS (`X-Amz-Date` + `X-Amz-Expires`, `X-Goog-Date` + `X-Goog-Expires`)
and CloudFront's signed URLs (`Expires=<epoch seconds>`). A URL that says nothing is
kept until the CDN refuses it (fetch.py then resolves again).
"""

import calendar
import math
import time
import urllib.parse

# Resolve again when this share of a URL's lifetime is left, at most MAX_MARGIN seconds
# before it runs out: a block's request must start while the URL is good.
MARGIN_SHARE = 0.2
MAX_MARGIN = 60.0
# A signing time further than this from our clock is taken as skew, not as age: the
# lifetime is then counted from when we received the URL.
MAX_CLOCK_SKEW = 300.0

_SIGNED_FORMS = (("X-Amz-Date", "X-Amz-Expires"), ("X-Goog-Date", "X-Goog-Expires"))


def seconds_left(url: str, now: float) -> float | None:
    """Seconds until `url` stops being good as of wall-clock `now`; None if it does not say."""
    query = {k.lower(): v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).items()}
    for date_name, expires_name in _SIGNED_FORMS:
        if date_name.lower() in query and expires_name.lower() in query:
            return _presigned_left(query[date_name.lower()], query[expires_name.lower()], now)
    if "expires" in query:
        return _epoch_left(query["expires"], now)
    return None


def refresh_after(url: str, now: float) -> float:
    """Seconds from `now`, when `url` was just received, after which to resolve it again.

    inf: keep it until the CDN refuses it. A URL that seems to have run out as it arrives
    says our clock is wrong, not the URL: resolving again would only loop.
    """
    left = seconds_left(url, now)
    if left is None or left <= 0:
        return math.inf
    return max(0.0, left - min(MAX_MARGIN, left * MARGIN_SHARE))


def _presigned_left(date: str, expires: str, now: float) -> float | None:
    try:
        signed_at = calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))
        lifetime = float(expires)
    except ValueError:
        return None
    if abs(now - signed_at) > MAX_CLOCK_SKEW:
        return lifetime
    return min(lifetime, signed_at + lifetime - now)


def _epoch_left(expires: str, now: float) -> float | None:
    try:
        return float(expires) - now
    except ValueError:
        return None
