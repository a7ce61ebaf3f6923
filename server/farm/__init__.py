"""`styleheat farm render`: one clip rendered by many workers of a Ray cluster.

* :mod:`server.farm.plan` -- per-frame input hashes, the manifest, which frames to render, chunking
  (pure Python + numpy; no Ray);
* :mod:`server.farm.worker` -- the per-GPU (or per-CPU-worker) actor: loads the model once, inverts the
  portrait once, renders chunks and writes their frames atomically;
* :mod:`server.farm.driver` -- validation, the cluster (local on 127.0.0.1 or ``--address``), the
  ``ray.wait`` scheduling loop, failures, Ctrl-C and the manifest.

User documentation: docs/farm.md.
"""
