"""Ray Jobs entrypoint: `python jobs/score.py SPEC [key=value ...]` (`kiln submit --kind score`).

Scores the spec's `score` section (model ref, input, output, ...) with kiln's batch scorer, the
same code path as `kiln score`, on the cluster the job runs in. Exits 0 on success, 2 on a user
error (bad spec, bad input, unknown model), 1 on a failed run.
"""

import sys

from kiln.cli.main import main
from kiln.errors import KilnError
from kiln.jobs.entry import score_argv

if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python jobs/score.py SPEC [key=value ...]", file=sys.stderr)
        sys.exit(2)
    try:
        argv = score_argv(sys.argv[1], sys.argv[2:])
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(argv))
