"""The ZeroMQ service ``styleheat-server``: the server and its request handlers (app), the engine thread
(worker), jobs and credit (scheduler), CURVE keys (curve_keys), image coding (images) and the models
the bake requests need (bake_models). Protocol: docs/protocol.md and server/protocol.py."""
