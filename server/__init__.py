"""StyleHEAT inference side: engine, checkpoint manager, ZeroMQ server and the `styleheat` CLI.

Nothing in this package imports bpy.
"""
