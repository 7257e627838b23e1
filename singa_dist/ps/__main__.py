"""A parameter-server process, as `singa-launch` starts it: `python -m singa_dist.ps`."""
import os
import sys

from singa_dist import runtime
from singa_dist.ps.server import serve

if __name__ == "__main__":
    serve()  # joins the job itself
    runtime.shutdown()
    # Served and left the job cleanly: nothing is left to write (checkpoints are written within the updates). The
    # interpreter's own teardown of torch's RPC and process-group objects takes over a second, which the end of
    # every job would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
