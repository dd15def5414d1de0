"""Ray Jobs entrypoint: `ray job submit ... -- python jobs/train.py SPEC [key=value ...]`.

Parses the spec at the edge, runs kiln's trainer on the cluster the job runs in, and exits 0 on
success, 2 on a user error (bad spec or data), 1 on a failed run.
"""

import sys

from kiln.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
