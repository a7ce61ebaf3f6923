"""``python -m server.app`` starts ``styleheat-server``; the service itself is :mod:`server.service.app`.

This launcher stays at this path because the Blender add-on starts a local server as
``PYTHON -m server.app`` (blender_addon/localserver.py).
"""
from __future__ import annotations

import sys

from server.service.app import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
