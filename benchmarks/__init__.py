"""The project's benchmarks: each module a short script over `benchmarks.common`.

Run one from the project's root as `python -m benchmarks.NAME` (`make benchmark`
runs them all). A benchmark imports `benchmarks.common` and the project's
package, never another benchmark that imports it back and never the tests.
"""
