"""`python -m mnist_mlops.serving.healthcheck`: exit 0 if this container's model server answers.

The images' HEALTHCHECK: it asks `/ping` on 127.0.0.1 at MNIST_SERVE_PORT
(5000) and needs nothing but the standard library, so it works in the slim
serving image and costs one short Python start.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('MNIST_SERVE_PORT', '5000')}/ping"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"{url}: {getattr(error, 'reason', error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
