"""A parameter-server process, as `singa-launch` starts it: `python -m singa_dist.ps`."""
from singa_dist import runtime
from singa_dist.ps.server import serve

if __name__ == "__main__":
    serve()  # joins the job itself
    runtime.shutdown()
