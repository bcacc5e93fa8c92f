"""Container health check: exit 0 when the server answers 2xx on a path (default /readyz), else 1.

Python rather than curl because slim images have no curl. Used by the Dockerfile's HEALTHCHECK and compose.
"""

import os
import sys
import urllib.request

host = os.environ.get("VAE_HOST", "0.0.0.0")
if host in ("", "0.0.0.0", "::"):
    host = "127.0.0.1"
elif ":" in host:
    host = f"[{host}]"
url = f"http://{host}:{os.environ.get('VAE_PORT', '8000')}{sys.argv[1] if len(sys.argv) > 1 else '/readyz'}"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP(S)_PROXY
try:
    with opener.open(url, timeout=4) as response:
        sys.exit(0 if 200 <= response.status < 300 else 1)
except Exception as e:  # HTTPError (503 while loading), connection refused, timeout
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
