"""`python -m testing.fake_llm --port 8811 --latency 1.0 --rate-429 0.1 ...`"""

import sys

from testing.fake_llm.server import main

if __name__ == "__main__":
    sys.exit(main())
