"""Independent, deliberately plain reference implementation of the method (docs/method.md).

Used only as a test oracle. It must never import from the ``cfga`` package.
"""
