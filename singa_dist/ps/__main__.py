"""A parameter-server process, as `singa-launch` starts it: `python -m singa_dist.ps`."""
import singa_dist as sd
from singa_dist.ps.server import serve

if __name__ == "__main__":
    sd.init()
    serve()
    sd.shutdown()
