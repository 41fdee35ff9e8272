"""Container health check: exit 0 when the service on this host answers 200 on /ready, else 1."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('CLASSIFIER_PORT', '8000')}/ready"
try:
    with urllib.request.urlopen(url, timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:  # refused, timed out, or an HTTP error status such as 503 while loading
    sys.exit(1)
