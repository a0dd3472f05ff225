"""The artifact store: versioned, locked, content-addressed stage outputs and the commands that inspect them.

Imports only `looper.config`, `looper.errors`, `looper.hashing` and itself; every other wing builds on it.
"""
