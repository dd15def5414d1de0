"""Ray Jobs entrypoint: `ray job submit ... -- python jobs/tune.py SPEC [key=value ...]`.

Parses the spec at the edge, runs the spec's `tune` sweep on the cluster the job runs in
(`--resume SWEEP_DIR` continues an interrupted one), registers the best trial, and exits 0 on
success, 2 on a user error (bad spec, data or an unschedulable plan), 1 on a failed sweep.
"""

import sys

from kiln.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
