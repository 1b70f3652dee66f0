"""Shared pytest configuration: the lab fixtures (``lab``, ``lab_vm``) from kura.lab.testing."""

pytest_plugins = ["kura.lab.testing"]
