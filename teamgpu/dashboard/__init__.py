"""The admin web dashboard (``/dashboard``): sessions, routes, page and static files.

See :mod:`teamgpu.dashboard.routes` and docs/observability.md.
"""
