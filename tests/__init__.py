"""The test suite, a package so that `tests` is this folder even where robustbench 1.1.1 (the
reference of tests/test_zoo.py) installed its own top-level `tests` package."""
