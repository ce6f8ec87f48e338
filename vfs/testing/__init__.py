"""Test and demo support shipped with the package: the Hub simulator and model generators."""
