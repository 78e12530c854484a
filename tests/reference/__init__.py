"""Independent, deliberately plain reference implementation of /work/shared/spec/SPEC.md.

Used only as a test oracle. It must never import from the ``cfga`` package.
"""
