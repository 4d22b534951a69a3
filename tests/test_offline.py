"""The test suite itself runs offline: any connection that is not loopback fails the test that makes it."""

import socket

import pytest


def test_network_connections_fail_the_test():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(AssertionError, match="test tried to reach the network"):
            s.connect(("93.184.216.34", 80))
