"""Test doubles for the operator, in the way of `kopf.testing`: a Kubernetes API emulator on kmock
(`emulator`) and an in-memory client (`memclient`), for the tests, the demo and the benchmark.

Not production code: no module outside this subpackage imports it (tests/unit/test_package_boundaries.py),
the operator image excludes it (operator/Dockerfile.dockerignore), and `emulator` needs kmock, which is
only in the dev extra.
"""
