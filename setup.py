"""Build hook for the one native part: the delta codec's apply loop (see docs/delta-codec.md).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler
the install still succeeds and the codec falls back to a slower, more memory-hungry numpy path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "firmware_bundles.codec._apply",
            ["firmware_bundles/codec/_apply.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "firmware_bundles.codec._match",
            ["firmware_bundles/codec/_match.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ],
)
