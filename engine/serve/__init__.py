"""``persona serve``: the local service behind Tinker's own HTTP interface.

The real Tinker SDK drives it unmodified (``TINKER_BASE_URL=http://127.0.0.1:PORT``):
``app`` holds the routes, ``state`` the sessions, models, samplers and futures over one
``LocalServiceClient``, ``codec`` the protobuf bodies, ``futures`` the long polls and the
seq_id order, ``keys`` the API key, ``paths`` the ``tinker://`` checkpoint folders, and
``server`` the ways to run it.
"""
